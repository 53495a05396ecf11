//! The host agent daemon: configuration, and the task wiring of store, API, DPU links, FRR and
//! metrics.
//!
//! Desired state of every DPU = the configuration in etcd (node, VPCs, static routes, NAT,
//! meters) plus the routes FRR installs (static routes of the configuration win on the same
//! prefix). The links start only after the first successful load from etcd: a host agent that
//! restarts while etcd is down must not tell its DPUs "nothing is desired" (they keep
//! forwarding on what they have). Status acknowledged by DPUs goes to etcd (per DPU and object,
//! bound to the DPU's lease), to Prometheus, and back to zebra for the routes it sent: once
//! per status change (the RIB records what zebra was told on its current connection).
//!
//! zebra's routes that are on no DPU (not ours, waiting, or refused by the model) are kept in
//! a registry ([`RefusedRoutes`]) that `dpuctl status` lists and `dpucp_frr_routes_refused`
//! counts; new ones are logged at WARN, a few examples and then one summary line per second.
//!
//! Health metrics follow reality within a couple of seconds: `dpucp_etcd_up` from an active
//! probe ([`ETCD_PROBE_EVERY`], [`ETCD_PROBE_TIMEOUT`]), `dpucp_fpm_connected` from the FPM
//! server's own view of zebra's socket, `dpucp_dpu_link_up` from each link's events.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flow_offload::model::{
    Change, Model, ModelError, Name, ObjectKey, PortId, Route, RouteKey, TableId, UNDERLAY_TABLE,
};
use flow_offload::status::{FailReason, OffloadStatus};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::dpu_link::{self, DpuEvent, LinkConfig};
use crate::fpm::feedback::status_flags;
use crate::fpm::{
    ChangeBatch, FeedbackEncoder, FpmConfig, FpmServer, Refusal, RefusedRoutes, ReplayEnd,
    ReplayTracker, Rib, ServerEvent, StaticAttribution, TableEncoding, ZebraRoute,
};
use crate::metrics::{Kind, Metrics, WarnLimiter};
use crate::store::{DpuLease, DpuRecord, PortCaps, Store, StoreConfig};

/// One DPU this host supervises.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpuConfig {
    /// Its id (as its agent reports it).
    pub id: String,
    /// Its agent's link address.
    pub link: String,
    /// Its place in an A/B pair (absent: a single DPU).
    #[serde(default)]
    pub pair: Option<PairSection>,
}

/// A DPU's place in an A/B pair: the host agent campaigns for the pair's leader key on its
/// behalf while its link is up (see [`crate::pair`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairSection {
    /// The pair's name (its leader key is `/dpucp/v1/pairs/GROUP/leader`).
    pub group: String,
    /// This member: `a` or `b` (must match the agent's `[ha] member`).
    pub member: String,
    /// The lease TTL in seconds; the active fences itself when it has no proof of the lease
    /// for that long (minus the agent's margin).
    #[serde(default = "default_pair_ttl")]
    pub lease_ttl_secs: i64,
}

fn default_pair_ttl() -> i64 {
    2
}

/// etcd.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    /// Endpoints (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
}

/// A listen address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// `ip:port`.
    pub listen: String,
}

/// The configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// etcd.
    pub etcd: EtcdSection,
    /// gRPC API.
    pub api: Listen,
    /// Prometheus endpoint.
    pub metrics: Listen,
    /// zebra's FPM connection (absent: no FRR on this host).
    pub fpm: Option<FpmSection>,
    /// DPUs.
    #[serde(default)]
    pub dpus: Vec<DpuConfig>,
    /// The interface manager (absent: the host's VRF interfaces are managed elsewhere).
    #[serde(default)]
    pub interfaces: Option<crate::ifmgr::InterfacesSection>,
    /// Image flashing (absent: defaults, chunk servers on any address, no host-side key check).
    #[serde(default)]
    pub images: Option<crate::flashing::ImagesSection>,
}

/// FPM settings: where zebra connects, and what the host knows that zebra does not say.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FpmSection {
    /// Where zebra connects (`fpm address ... port ...`).
    pub listen: String,
    /// How feedback addresses tables: `"table-id"`, or `"main-as-zero"` for FRR 10.3.0–10.3.4
    /// (which also needs zebra `-R 0`). Absent: detected from `zebra --version`.
    pub table_encoding: Option<String>,
    /// Host interface name → DPU port, for routes out of those interfaces.
    #[serde(default)]
    pub interfaces: BTreeMap<String, u16>,
    /// Underlay gateway → MAC (static neighbours).
    #[serde(default)]
    pub neighbours: BTreeMap<String, String>,
    /// How to ask zebra for its VRF ids: a vtysh command line (e.g. `["vtysh"]`), run with
    /// `-c "show vrf"` appended. Needed only with FRR 10.3.0–10.3.4 and netns VRFs: that FRR
    /// reads feedback's table field as a VRF id, and a netns VRF's id is zebra's own counter,
    /// which nothing on the FPM connection carries.
    #[serde(default)]
    pub vtysh: Vec<String>,
    /// After a start, the DPU links wait this long for zebra's first replay (or until it is
    /// over, whichever comes first) before sending the DPUs anything: a restarted host agent
    /// knows none of FRR's routes yet, and a full resync without them would withdraw every
    /// FRR route from the DPUs until zebra replays. The DPUs forward on their last state
    /// meanwhile. 0 starts the links at once.
    #[serde(default = "default_startup_hold_secs")]
    pub startup_hold_secs: u64,
}

fn default_startup_hold_secs() -> u64 {
    10
}

/// A configuration error naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML of this shape.
    #[error("{0}")]
    Syntax(String),
    /// A bad value.
    #[error("{field}: {problem}")]
    Invalid {
        /// Its path.
        field: String,
        /// What is wrong.
        problem: String,
    },
}

fn addr(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|e| ConfigError::Invalid {
        field: field.to_owned(),
        problem: format!("not an ip:port: {e}"),
    })
}

/// A listener's address, which must be loopback: nothing in this build speaks TLS yet, and
/// nothing may listen beyond loopback without it (the daemon refuses to start).
fn loopback(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    let a = addr(field, s)?;
    if a.ip().is_loopback() {
        Ok(a)
    } else {
        Err(ConfigError::Invalid {
            field: field.to_owned(),
            problem: format!(
                "{a} is not a loopback address: this build has no TLS, and nothing listens beyond loopback without it (use 127.0.0.1 or ::1)"
            ),
        })
    }
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        if c.etcd.endpoints.is_empty() {
            return Err(ConfigError::Invalid {
                field: "etcd.endpoints".into(),
                problem: "at least one endpoint".into(),
            });
        }
        loopback("api.listen", &c.api.listen)?;
        loopback("metrics.listen", &c.metrics.listen)?;
        if let Some(f) = &c.fpm {
            loopback("fpm.listen", &f.listen)?;
            match f.table_encoding.as_deref() {
                None | Some("table-id") | Some("main-as-zero") => {}
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        field: "fpm.table_encoding".into(),
                        problem: format!("{other:?}: expected \"table-id\" or \"main-as-zero\""),
                    })
                }
            }
            for (ip, mac) in &f.neighbours {
                ip.parse::<std::net::IpAddr>()
                    .map_err(|e| ConfigError::Invalid {
                        field: format!("fpm.neighbours.{ip}"),
                        problem: format!("not an IP address: {e}"),
                    })?;
                parse_mac(mac).ok_or_else(|| ConfigError::Invalid {
                    field: format!("fpm.neighbours.{ip}"),
                    problem: format!("{mac:?} is not a MAC address"),
                })?;
            }
        }
        for (i, d) in c.dpus.iter().enumerate() {
            Name::new(&d.id).map_err(|p| ConfigError::Invalid {
                field: format!("dpus[{i}].id"),
                problem: p.to_string(),
            })?;
            addr(&format!("dpus[{i}].link"), &d.link)?;
            if let Some(p) = &d.pair {
                let bad = |field: &str, problem: String| ConfigError::Invalid {
                    field: format!("dpus[{i}].pair.{field}"),
                    problem,
                };
                Name::new(&p.group).map_err(|e| bad("group", e.to_string()))?;
                if !matches!(p.member.as_str(), "a" | "b") {
                    return Err(bad(
                        "member",
                        format!("{:?} is not \"a\" or \"b\"", p.member),
                    ));
                }
                if !(1..=60).contains(&p.lease_ttl_secs) {
                    return Err(bad(
                        "lease_ttl_secs",
                        format!("{} is not in 1..=60", p.lease_ttl_secs),
                    ));
                }
                let twin = c.dpus.iter().take(i).position(|o| {
                    o.pair
                        .as_ref()
                        .is_some_and(|q| q.group == p.group && q.member == p.member)
                });
                if let Some(j) = twin {
                    return Err(bad(
                        "member",
                        format!(
                            "dpus[{j}] is already member {} of pair {}",
                            p.member, p.group
                        ),
                    ));
                }
            }
        }
        if let Some(im) = &c.images {
            loopback("images.listen", &im.listen)?;
        }
        Ok(c)
    }
}

fn parse_mac(s: &str) -> Option<flow_offload::model::MacAddr> {
    let b: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let a: [u8; 6] = b.try_into().ok()?;
    Some(flow_offload::model::MacAddr(a))
}

/// The attribution of zebra's routes: the configured interfaces and neighbours, zebra's main
/// table as the underlay, and each VPC's table and VNI from the configuration in force.
fn attribution(f: &FpmSection, config: &Model) -> StaticAttribution {
    let mut a = StaticAttribution::default();
    a.tables.insert(UNDERLAY_TABLE.0, UNDERLAY_TABLE);
    // zebra `-R 0` (needed by FRR 10.3's feedback, DESIGN.md) makes 0 its main table; no VPC
    // can have table 0, so it is the underlay either way.
    a.tables.insert(0, UNDERLAY_TABLE);
    for vpc in config.vpcs().values() {
        a.tables.insert(vpc.table.0, vpc.table);
        a.vnis.insert(vpc.vni.get(), vpc.table);
    }
    // Asked over netlink, not /sys: this process may share another namespace's sysfs.
    let ifindexes = if f.interfaces.is_empty() {
        BTreeMap::new()
    } else {
        crate::ifmgr::ifindexes().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list interfaces; no route is attributed to a DPU port");
            BTreeMap::new()
        })
    };
    for (name, port) in &f.interfaces {
        match ifindexes.get(name).copied() {
            Some(ifindex) => {
                a.ports.insert(ifindex, PortId(*port));
            }
            None => {
                tracing::warn!(interface = %name, "no such interface; its routes are not the DPU's")
            }
        }
    }
    for (ip, mac) in &f.neighbours {
        if let (Ok(ip), Some(mac)) = (ip.parse(), parse_mac(mac)) {
            a.macs.insert(ip, mac);
        }
    }
    a
}

/// VPC table → VPC name.
fn vpc_tables(config: &Model) -> BTreeMap<TableId, Name> {
    config
        .vpcs()
        .values()
        .map(|v| (v.table, v.name.clone()))
        .collect()
}

/// The feedback table encoding: configured, or detected from the local zebra's version.
fn table_encoding(f: &FpmSection) -> TableEncoding {
    let configured = match f.table_encoding.as_deref() {
        Some("main-as-zero") => Some(TableEncoding::VrfIdMainAsZero),
        Some("table-id") => Some(TableEncoding::TableId),
        _ => None,
    };
    let version = std::process::Command::new("/usr/lib/frr/zebra")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    TableEncoding::detect(&version, configured)
}

/// The most telling of several DPUs' statuses for one route (failed, then software).
fn worst(a: &OffloadStatus, b: &OffloadStatus) -> OffloadStatus {
    let rank = |s: &OffloadStatus| match s {
        OffloadStatus::Offloaded => 0,
        OffloadStatus::Software { .. } => 1,
        OffloadStatus::Failed { .. } => 2,
    };
    if rank(b) > rank(a) {
        b.clone()
    } else {
        a.clone()
    }
}

/// zebra's side: the FPM server, its RIB and the feedback path.
struct Frr {
    server: FpmServer,
    events: mpsc::Receiver<ServerEvent>,
    rib: Rib,
    section: FpmSection,
    attr: StaticAttribution,
    /// zebra's replay after a (re)connect: when it is over, and whether it may remove
    /// routes ([`crate::fpm::replay`]: only a connection that delivered a replay and went
    /// quiet sweeps; one that sent nothing or garbage, or died, removes nothing).
    replay: ReplayTracker,
    /// Feedback's table encoding.
    encoding: TableEncoding,
    /// VPC table → VPC name, from the configuration in force.
    vpc_tables: BTreeMap<TableId, Name>,
    /// zebra's VRF ids by name (see [`FpmSection::vtysh`]), and when they were last asked.
    vrf_ids: BTreeMap<String, u32>,
    vrf_ids_asked: Option<tokio::time::Instant>,
    /// Routes whose offload status went back to zebra.
    feedback_sent: u64,
    /// zebra's routes on no DPU, and why (shared with the API).
    refused: RefusedRoutes,
    /// The WARN budget of new refusals.
    refusal_log: WarnLimiter,
}

/// New refusals logged in full per [`REFUSAL_LOG_WINDOW`]; the rest go in one summary line.
const REFUSAL_LOG_EXAMPLES: u32 = 5;
/// The window of the refusals' WARN budget.
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(1);

/// Parses `show vrf` output lines `vrf NAME id N netns PATH`.
fn parse_show_vrf(out: &str) -> BTreeMap<String, u32> {
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["vrf", name, "id", id, ..] => id.parse().ok().map(|id| ((*name).to_owned(), id)),
                _ => None,
            }
        })
        .collect()
}

impl Frr {
    /// Feeds zebra's route changes into the desired state; records the routes left on no DPU
    /// (the RIB's and the model's), and answers the model's refusals as failed.
    async fn flush(&mut self, batch: &mut ChangeBatch, desired: &mut Desired) -> bool {
        self.note_not_taken();
        if batch.is_empty() {
            return false;
        }
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for c in batch.take() {
            match c {
                Change::UpsertRoute(r) => upserts.push(r),
                Change::DeleteRoute(k) => deletes.push(k),
                _ => {}
            }
        }
        let verdicts = desired.frr_routes(upserts, deletes);
        self.model_verdicts(verdicts).await;
        true
    }

    /// The RIB's changes of the routes it did not take, into the registry (new ones logged).
    fn note_not_taken(&mut self) {
        for (z, why) in self.rib.take_not_taken() {
            if self.refused.set_not_taken(z, why) {
                if let Some(n) = why {
                    self.log_refusal(&z, None, &Refusal::NotTaken(n));
                }
            }
        }
    }

    /// The model's verdicts on FRR routes, into the registry (new ones logged); the refused
    /// routes are acknowledged to zebra as failed.
    async fn model_verdicts(&mut self, v: Verdicts) {
        for k in &v.cleared {
            self.refused.set_model(*k, None, None);
        }
        if v.refused.is_empty() {
            return;
        }
        let mut failed = Vec::with_capacity(v.refused.len());
        for (k, e) in v.refused {
            let z = self.rib.zebra_route(&k);
            if self.refused.set_model(k, z, Some(e.clone())) {
                let zr = z.unwrap_or(ZebraRoute {
                    table: k.table.0,
                    prefix: k.prefix,
                    protocol: 0,
                });
                self.log_refusal(&zr, Some(k), &Refusal::Model(e.clone()));
            }
            failed.push((
                k,
                OffloadStatus::Failed {
                    reason: FailReason::Invalid(e),
                },
            ));
        }
        self.ack(&failed).await;
    }

    /// A new refusal at WARN, within the budget (counted for the summary otherwise).
    fn log_refusal(&mut self, z: &ZebraRoute, model: Option<RouteKey>, why: &Refusal) {
        if self
            .refusal_log
            .allow(std::time::Instant::now(), why.code())
        {
            match model {
                Some(k) => tracing::warn!(prefix = %z.prefix, zebra_table = z.table,
                    table = k.table.0, reason = why.code(), "FRR route on no DPU: {why}"),
                None => tracing::warn!(prefix = %z.prefix, zebra_table = z.table,
                    reason = why.code(), "FRR route on no DPU: {why}"),
            }
        }
    }

    /// The summary of the refusals not logged in full, once their window is over.
    fn refusal_summary(&mut self) {
        if let Some(counts) = self.refusal_log.summary(std::time::Instant::now()) {
            tracing::warn!(window = ?self.refusal_log.window(), more = %crate::metrics::format_counts(&counts),
                refused_now = self.refused.len(),
                "more FRR routes on no DPU than logged (dpuctl status lists them all)");
        }
    }

    /// The zebra route to acknowledge for model route `k`: as zebra sent it, except that a netns
    /// VRF's route (sent with the main table) is addressed by its VRF id where zebra reads the
    /// table field as one (FRR 10.3.0–10.3.4). `None` if that id is unknown.
    fn feedback_route(&self, k: &RouteKey) -> Option<ZebraRoute> {
        let mut z = self.rib.zebra_route(k)?;
        let main = z.table == 0 || z.table == UNDERLAY_TABLE.0;
        if self.encoding == TableEncoding::VrfIdMainAsZero && main && k.table != UNDERLAY_TABLE {
            let vpc = self.vpc_tables.get(&k.table)?;
            z.table = *self.vrf_ids.get(vpc.as_str())?;
        }
        Some(z)
    }

    /// Asks zebra for its VRF ids if some VPC's is unknown (at most once a second).
    async fn refresh_vrf_ids(&mut self) {
        if self.section.vtysh.is_empty() || self.encoding != TableEncoding::VrfIdMainAsZero {
            return;
        }
        if self
            .vpc_tables
            .values()
            .all(|n| self.vrf_ids.contains_key(n.as_str()))
        {
            return;
        }
        let now = tokio::time::Instant::now();
        if self
            .vrf_ids_asked
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.vrf_ids_asked = Some(now);
        let (cmd, args) = match self.section.vtysh.split_first() {
            Some(x) => x,
            None => return,
        };
        let out = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::process::Command::new(cmd)
                .args(args)
                .args(["-c", "show vrf"])
                .kill_on_drop(true)
                .output(),
        )
        .await;
        match out {
            Ok(Ok(o)) if o.status.success() => {
                self.vrf_ids = parse_show_vrf(&String::from_utf8_lossy(&o.stdout));
                tracing::info!(vrf_ids = ?self.vrf_ids, "zebra's VRF ids");
            }
            Ok(Ok(o)) => {
                tracing::warn!(status = %o.status, "vtysh show vrf failed; VPC routes are not acknowledged yet")
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot run vtysh; VPC routes are not acknowledged yet")
            }
            Err(_) => {
                tracing::warn!("vtysh show vrf timed out; VPC routes are not acknowledged yet")
            }
        }
    }

    /// Acknowledges routes to zebra: only those whose status zebra was not already told on
    /// this connection (since it last sent the route). Returns how many were sent.
    async fn ack(&mut self, statuses: &[(RouteKey, OffloadStatus)]) -> usize {
        self.refresh_vrf_ids().await;
        let mut sent = Vec::new();
        let pairs: Vec<(ZebraRoute, OffloadStatus)> = statuses
            .iter()
            .filter_map(|(k, s)| {
                let flags = status_flags(s);
                if !self.rib.feedback_due(k, flags) {
                    return None;
                }
                let z = self.feedback_route(k)?;
                sent.push((*k, flags));
                Some((z, s.clone()))
            })
            .collect();
        if pairs.is_empty() {
            return 0;
        }
        match self
            .server
            .feedback()
            .ack(pairs.iter().map(|(z, s)| (z, s)))
            .await
        {
            Ok(_) => {
                self.feedback_sent += pairs.len() as u64;
                for (k, flags) in &sent {
                    self.rib.note_feedback(k, *flags);
                }
                pairs.len()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot send offload status to zebra");
                0
            }
        }
    }
}

/// Every route's status over all DPUs (the worst of them).
fn route_statuses(
    statuses: &BTreeMap<String, BTreeMap<ObjectKey, OffloadStatus>>,
) -> Vec<(RouteKey, OffloadStatus)> {
    let mut out: BTreeMap<RouteKey, OffloadStatus> = BTreeMap::new();
    for m in statuses.values() {
        for (k, s) in m {
            if let ObjectKey::Route(r) = k {
                let e = out.entry(*r).or_insert_with(|| s.clone());
                *e = worst(e, s);
            }
        }
    }
    out.into_iter().collect()
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Configuration.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The API server.
    #[error("API: {0}")]
    Api(#[from] crate::api::ApiError),
    /// A listener.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// etcd.
    #[error("etcd: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The FPM server.
    #[error("FPM: {0}")]
    Fpm(#[from] crate::fpm::server::FpmServerError),
    /// The interface manager's set-up.
    #[error("{0}")]
    Interfaces(#[from] crate::ifmgr::IfmgrError),
}

/// The interface manager's task state: the plan last made true, and when to look again.
struct Interfaces {
    manager: Arc<crate::ifmgr::InterfaceManager>,
    done: Option<BTreeMap<String, crate::ifmgr::VpcInterfaces>>,
}

impl Interfaces {
    /// Reconciles if the plan changed, or always when `drift` (periodic check).
    async fn reconcile(&mut self, config: &Model, drift: bool) {
        let plan = crate::ifmgr::plan(config);
        if !drift && self.done.as_ref() == Some(&plan) {
            return;
        }
        let m = self.manager.clone();
        let p = plan.clone();
        match tokio::task::spawn_blocking(move || m.reconcile(&p)).await {
            Ok(Ok(report)) => {
                if !report.changed.is_empty() || !report.removed.is_empty() {
                    tracing::info!(changed = ?report.changed.keys().collect::<Vec<_>>(),
                        removed = ?report.removed, "VPC interfaces reconciled");
                }
                self.done = Some(plan);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot make the VPC interfaces; retrying in 10 s");
                self.done = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "interface manager task failed");
                self.done = None;
            }
        }
    }
}

/// The model's verdicts on FRR routes after a change: the routes it now refuses, with why
/// (new refusals, and refusals whose reason changed), and the routes it no longer refuses
/// (accepted, shadowed by a configured route, or deleted).
#[derive(Debug, Default, PartialEq)]
pub struct Verdicts {
    /// Refused now, and why.
    pub refused: Vec<(RouteKey, ModelError)>,
    /// No longer refused.
    pub cleared: Vec<RouteKey>,
}

/// The merged desired state: configuration plus FRR's routes.
///
/// Every route zebra sent that the RIB took is kept in `frr`, also those the model refuses
/// (with why, in `refused`): a configuration change may make them valid (a node's uplink,
/// a VPC), and a change may make an accepted one invalid; either way the verdict changes and
/// is reported ([`Verdicts`]). A refused update of a route withdraws the version in force:
/// zebra no longer has it.
#[derive(Debug, Default)]
pub struct Desired {
    config: Model,
    frr: BTreeMap<RouteKey, Route>,
    refused: BTreeMap<RouteKey, ModelError>,
    model: Model,
}

/// The error of a one-change batch, without the batch wrapper.
fn single(e: ModelError) -> ModelError {
    match e {
        ModelError::InBatch { source, .. } => *source,
        e => e,
    }
}

impl Desired {
    /// Replaces the configuration.
    pub fn set_config(&mut self, config: Model) -> Verdicts {
        self.config = config;
        self.rebuild()
    }

    /// Applies configuration changes (from the etcd watch).
    pub fn config_changes(&mut self, changes: &[Change]) -> Verdicts {
        if self.config.apply(changes).is_err() {
            tracing::warn!("configuration changes do not apply to the cached model; reloading");
        }
        // Static routes of the configuration shadow FRR's, and the configuration decides
        // which FRR routes are valid: apply the batch to the merged model directly only when
        // it is nothing but routes that FRR does not have; otherwise rebuild.
        let simple = changes.iter().all(|c| match c {
            Change::UpsertRoute(r) => !self.frr.contains_key(&r.key),
            Change::DeleteRoute(k) => !self.frr.contains_key(k),
            _ => false,
        });
        if simple && self.model.apply(changes).is_ok() {
            return Verdicts::default();
        }
        self.rebuild()
    }

    /// Sets or removes FRR routes; returns the model's verdicts on them.
    pub fn frr_routes(&mut self, upserts: Vec<Route>, deletes: Vec<RouteKey>) -> Verdicts {
        let mut v = Verdicts::default();
        for k in deletes {
            if self.frr.remove(&k).is_none() {
                continue;
            }
            if self.refused.remove(&k).is_some() {
                v.cleared.push(k);
            } else if !self.config.routes().contains_key(&k) {
                let _ = self.model.apply(&[Change::DeleteRoute(k)]);
            }
        }
        for r in upserts {
            let key = r.key;
            if self.config.routes().contains_key(&key) {
                // Shadowed by the configuration: not refused, not in force.
                self.frr.insert(key, r);
                if self.refused.remove(&key).is_some() {
                    v.cleared.push(key);
                }
                continue;
            }
            match self.model.apply(&[Change::UpsertRoute(r.clone())]) {
                Ok(()) => {
                    if self.refused.remove(&key).is_some() {
                        v.cleared.push(key);
                    }
                }
                Err(e) => {
                    let e = single(e);
                    if self.frr.contains_key(&key) && !self.refused.contains_key(&key) {
                        // zebra replaced a route in force with one the model refuses.
                        let _ = self.model.apply(&[Change::DeleteRoute(key)]);
                    }
                    self.refused.insert(key, e.clone());
                    v.refused.push((key, e));
                }
            }
            self.frr.insert(key, r);
        }
        v
    }

    /// The merged model again, from the configuration and every FRR route (O(model)).
    fn rebuild(&mut self) -> Verdicts {
        let mut m = self.config.clone();
        let mut refused = BTreeMap::new();
        for (k, r) in &self.frr {
            if !m.routes().contains_key(k) {
                if let Err(e) = m.apply(&[Change::UpsertRoute(r.clone())]) {
                    refused.insert(*k, single(e));
                }
            }
        }
        self.model = m;
        let mut v = Verdicts::default();
        for (k, e) in &refused {
            if self.refused.get(k) != Some(e) {
                v.refused.push((*k, e.clone()));
            }
        }
        v.cleared = self
            .refused
            .keys()
            .filter(|k| !refused.contains_key(k))
            .copied()
            .collect();
        self.refused = refused;
        v
    }

    /// The merged model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The configuration part.
    pub fn config(&self) -> &Model {
        &self.config
    }

    /// The FRR routes the model refuses, and why.
    pub fn refused(&self) -> &BTreeMap<RouteKey, ModelError> {
        &self.refused
    }
}

/// The health metrics' etcd probe: a linearizable read of one key (count only) every
/// [`ETCD_PROBE_EVERY`], bounded by [`ETCD_PROBE_TIMEOUT`]. It needs a leader, as writes do,
/// and costs etcd almost nothing.
pub const ETCD_PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long the etcd probe waits for an answer.
pub const ETCD_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Sets `dpucp_etcd_up` from [`ETCD_PROBE_EVERY`] probes until `shutdown` turns true (a
/// change is logged): the metric falls within [`ETCD_PROBE_EVERY`] +
/// [`ETCD_PROBE_TIMEOUT`] of etcd going away, whether or not anything else asked it.
async fn etcd_probe(store: Store, metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(ETCD_PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let mut client = store.client();
        let probe = client.get(
            crate::store::keys::GENERATION,
            Some(etcd_client::GetOptions::new().with_count_only()),
        );
        let up = match tokio::time::timeout(ETCD_PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {ETCD_PROBE_TIMEOUT:?}")),
        };
        metrics.set("dpucp_etcd_up", &[], if up.is_ok() { 1.0 } else { 0.0 });
        let now = up.is_ok();
        if last != Some(now) {
            match &up {
                Ok(()) => tracing::info!("etcd probe: etcd answers"),
                Err(e) => tracing::warn!(error = %e, "etcd probe: etcd does not answer"),
            }
        }
        last = Some(now);
    }
}

/// Runs the daemon until `shutdown` turns true.
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) -> Result<(), DaemonError> {
    // Checked first: a bad [interfaces] section stops the daemon before it serves anything.
    let mut interfaces = match &config.interfaces {
        Some(c) => Some(Interfaces {
            manager: Arc::new(crate::ifmgr::InterfaceManager::new(
                crate::ifmgr::Backend::from_config(c)?,
            )),
            done: None,
        }),
        None => None,
    };
    let metrics = Metrics::new();
    describe_metrics(&metrics);
    let store = Store::connect(&StoreConfig::new(
        config.etcd.endpoints.first().cloned().unwrap_or_default(),
    ))
    .await?;

    // Metrics and API first: operators can look while etcd is still coming up.
    let metrics_addr = addr("metrics.listen", &config.metrics.listen)?;
    let ml = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: metrics_addr,
            source,
        })?;
    tracing::info!(url = %crate::metrics::describe_addr(&metrics_addr), "metrics");
    let metrics_task = tokio::spawn(crate::metrics::serve(ml, metrics.clone(), shutdown.clone()));
    let api_addr = addr("api.listen", &config.api.listen)?;
    let api_store = store.clone();
    let mut api_shutdown = shutdown.clone();
    // The desired state pushed to the DPUs; the API lists FRR's routes from it.
    let (desired_tx, desired_rx) = watch::channel(Arc::new(Model::default()));
    let api_desired = desired_rx.clone();
    let hub = crate::flashing::FlashHub::new(
        config.images.clone().unwrap_or_default(),
        crate::flashing::FlashTimeouts::default(),
    );
    let api_hub = hub.clone();
    // zebra's routes on no DPU: the FRR side writes, `ListStatus` reads.
    let refused = RefusedRoutes::new();
    let pairs = crate::pair::PairStates::default();
    // Planned switchovers: the API reaches each member's link through these.
    let mut pair_controls = BTreeMap::new();
    let mut switchover_rx = BTreeMap::new();
    for d in &config.dpus {
        if let Some(p) = &d.pair {
            let (tx, rx) = mpsc::channel(4);
            pair_controls.insert(
                d.id.clone(),
                crate::pair::PairControl {
                    group: p.group.clone(),
                    switchover: tx,
                },
            );
            switchover_rx.insert(d.id.clone(), rx);
        }
    }
    let views = crate::api::DaemonViews {
        desired: Some(api_desired),
        hub: Some(api_hub),
        refused: config.fpm.as_ref().map(|_| refused.clone()),
        pairs: Some(pairs.clone()),
        pair_controls: Some(Arc::new(pair_controls)),
    };
    let api_task = tokio::spawn(async move {
        crate::api::serve(api_addr, api_store, views, async move {
            let _ = api_shutdown.wait_for(|s| *s).await;
        })
        .await
    });
    tracing::info!(%api_addr, "gRPC API");
    // etcd's health, probed whether or not anything else asks it.
    metrics.set("dpucp_etcd_up", &[], 0.0);
    let probe_task = tokio::spawn(etcd_probe(store.clone(), metrics.clone(), shutdown.clone()));
    // Each configured DPU's link, down until its agent says hello.
    for d in &config.dpus {
        metrics.set("dpucp_dpu_link_up", &[("dpu", &d.id)], 0.0);
        metrics.set("dpucp_dpu_up", &[("dpu", &d.id)], 0.0);
    }

    // The first load: retried until etcd answers.
    let (config_model, revision) = loop {
        match store.load().await {
            Ok(x) => break x,
            Err(e) => {
                tracing::warn!(error = %e, "etcd not reachable; DPU links wait for the first load");
                metrics.set("dpucp_etcd_up", &[], 0.0);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                }
            }
        }
    };
    metrics.set("dpucp_etcd_up", &[], 1.0);
    tracing::info!(
        revision,
        objects = config_model.to_changes().len(),
        "desired state loaded from etcd"
    );
    let mut desired = Desired::default();
    // No FRR route yet: nothing to refuse.
    let _ = desired.set_config(config_model.clone());
    // Sent before any link starts: links never see the empty placeholder.
    let _ = desired_tx.send(Arc::new(desired.model().clone()));

    // DPU links. With FRR configured they wait for zebra's first replay (bounded by
    // `startup_hold_secs`), so that the first resync of a DPU carries FRR's routes.
    let (ev_tx, mut ev_rx) = mpsc::channel::<DpuEvent>(1024);
    let mut link_addrs = Vec::new();
    for (i, d) in config.dpus.iter().enumerate() {
        let member = match &d.pair {
            Some(p) => Some((
                crate::pair::Member {
                    group: Name::new(&p.group).map_err(|e| ConfigError::Invalid {
                        field: format!("dpus[{i}].pair.group"),
                        problem: e.to_string(),
                    })?,
                    member: p.member.clone(),
                    dpu: d.id.clone(),
                },
                crate::pair::Timing {
                    ttl_secs: p.lease_ttl_secs,
                    ..crate::pair::Timing::default()
                },
                switchover_rx
                    .remove(&d.id)
                    .ok_or_else(|| ConfigError::Invalid {
                        field: format!("dpus[{i}].id"),
                        problem: "the same DPU id twice".to_owned(),
                    })?,
            )),
            None => None,
        };
        link_addrs.push((addr(&format!("dpus[{i}].link"), &d.link)?, member));
    }
    let (link_desired, link_shutdown, link_hub, link_store) = (
        desired_rx.clone(),
        shutdown.clone(),
        hub.clone(),
        store.clone(),
    );
    let start_links = move |addrs: Vec<LinkTarget>, ev_tx: mpsc::Sender<DpuEvent>| {
        let mut tasks = Vec::new();
        for (a, member) in addrs {
            let pair = member.map(|(member, timing, switchover)| {
                let (role_tx, role_rx) = watch::channel(None);
                let (up_tx, up_rx) = watch::channel(false);
                let (release_tx, release_rx) = watch::channel(None);
                tasks.push(tokio::spawn(crate::pair::run(
                    link_store.clone(),
                    member,
                    timing,
                    up_rx,
                    role_tx,
                    release_rx,
                    link_shutdown.clone(),
                )));
                dpu_link::PairLink {
                    role: role_rx,
                    up: up_tx,
                    switchover,
                    release: release_tx,
                }
            });
            tasks.push(tokio::spawn(dpu_link::run_member(
                a,
                LinkConfig::default(),
                link_desired.clone(),
                ev_tx.clone(),
                link_shutdown.clone(),
                Some(link_hub.clone()),
                pair,
            )));
        }
        tasks
    };
    let hold = config
        .fpm
        .as_ref()
        .map(|f| Duration::from_secs(f.startup_hold_secs))
        .filter(|d| !d.is_zero() && !link_addrs.is_empty());
    let mut links = Vec::new();
    let mut held_links: Option<(Vec<LinkTarget>, mpsc::Sender<DpuEvent>)> = None;
    let mut hold_until: Option<tokio::time::Instant> = None;
    match hold {
        Some(d) => {
            tracing::info!(hold_secs = d.as_secs(), dpus = link_addrs.len(),
                "DPU links wait for zebra's replay (the DPUs forward on their last state meanwhile)");
            hold_until = Some(tokio::time::Instant::now() + d);
            held_links = Some((link_addrs, ev_tx));
        }
        None => {
            links = start_links(link_addrs, ev_tx.clone());
            drop(ev_tx);
        }
    }

    // zebra, over FPM.
    let mut frr = match &config.fpm {
        Some(f) => {
            let listen = addr("fpm.listen", &f.listen)?;
            let encoding = table_encoding(f);
            let (server, events) = FpmServer::start(FpmConfig {
                listen,
                feedback: FeedbackEncoder::new(encoding),
                ..FpmConfig::default()
            })
            .await?;
            tracing::info!(%listen, ?encoding, "FPM server waiting for zebra");
            metrics.add("dpucp_fpm_refused_connections_total", &[], 0.0);
            metrics.add("dpucp_fpm_messages_total", &[], 0.0);
            fpm_health(&metrics, &server.counters());
            let mut rib = Rib::new();
            rib.track_not_taken();
            Some(Frr {
                server,
                events,
                rib,
                attr: attribution(f, &config_model),
                section: f.clone(),
                replay: ReplayTracker::default(),
                encoding,
                vpc_tables: vpc_tables(&config_model),
                vrf_ids: BTreeMap::new(),
                vrf_ids_asked: None,
                feedback_sent: 0,
                refused,
                refusal_log: WarnLimiter::new(REFUSAL_LOG_EXAMPLES, REFUSAL_LOG_WINDOW),
            })
        }
        None => None,
    };
    let mut batch = ChangeBatch::new();
    if let Some(i) = interfaces.as_mut() {
        i.reconcile(&config_model, false).await;
    }
    // The interfaces are checked again now and then: someone may have changed them by hand.
    let mut drift = tokio::time::interval(Duration::from_secs(15));
    drift.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut watch = store.watch(&config_model, revision);
    let writer = status_writer(store.clone());
    let mut sweep = tokio::time::interval(Duration::from_secs(2));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Health metrics read from their owners, and the refusal log's summary line.
    let mut health = tokio::time::interval(Duration::from_secs(1));
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut publish_at: Option<tokio::time::Instant> = None;
    let mut publish_cost = Duration::ZERO;
    let mut links_running = true;
    let mut leases: BTreeMap<String, DpuLease> = BTreeMap::new();
    let mut statuses: BTreeMap<String, BTreeMap<ObjectKey, OffloadStatus>> = BTreeMap::new();
    loop {
        let resync_at = frr.as_ref().and_then(|f| f.replay.deadline());
        tokio::select! {
            u = watch.next() => match u {
                Some(Ok(update)) => {
                    // `dpucp_etcd_up` is the probe's (`etcd_probe`): one writer, no flapping.
                    metrics.set("dpucp_etcd_revision", &[], update.revision as f64);
                    tracing::info!(revision = update.revision, changes = update.changes.len(), resync = update.resync, "configuration changed");
                    let verdicts = desired.config_changes(&update.changes);
                    if let Some(i) = interfaces.as_mut() {
                        i.reconcile(desired.config(), false).await;
                    }
                    if let Some(f) = frr.as_mut() {
                        // The configuration decides which FRR routes the model takes.
                        f.model_verdicts(verdicts).await;
                        // VPC tables and VNIs may have changed: attribute zebra's routes again.
                        f.attr = attribution(&f.section, desired.config());
                        f.vpc_tables = vpc_tables(desired.config());
                        f.rib.reevaluate_all(&f.attr, &mut batch);
                        f.flush(&mut batch, &mut desired).await;
                    }
                    let _ = desired_tx.send(Arc::new(desired.model().clone()));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "etcd watch error; forwarding continues on the last state");
                }
                None => {
                    tracing::error!("etcd watch ended; restarting it");
                    let (m, r) = store.last_model().unwrap_or((config_model.clone(), revision));
                    watch = store.watch(&m, r);
                }
            },
            ev = ev_rx.recv(), if links_running => {
                // No DPUs configured (or every link task gone): etcd and FRR still are.
                let Some(ev) = ev else {
                    links_running = false;
                    continue;
                };
                let is_ack = matches!(ev, DpuEvent::Acked { .. });
                let touched: Vec<RouteKey> = match &ev {
                    DpuEvent::Acked { status, .. } => status
                        .iter()
                        .filter_map(|(k, _)| match k {
                            ObjectKey::Route(r) => Some(*r),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                on_dpu_event(ev, &store, &metrics, &mut leases, &mut statuses, desired.model(), &writer, &pairs).await;
                if let (Some(f), true) = (frr.as_mut(), is_ack) {
                    // Acknowledge to zebra the worst status over all DPUs of the routes
                    // this batch touched, except routes the model refuses since (zebra was
                    // told they failed; a late acknowledgement of their old version must not
                    // undo that). Deleted routes are not zebra's any more: `ack` skips them,
                    // and sends only what zebra was not told yet.
                    let refused = desired.refused();
                    let these: Vec<(RouteKey, OffloadStatus)> = touched
                        .into_iter()
                        .filter(|k| !refused.contains_key(k))
                        .filter_map(|k| {
                            let o = ObjectKey::Route(k);
                            statuses
                                .values()
                                .filter_map(|m| m.get(&o))
                                .fold(None, |acc: Option<OffloadStatus>, s| {
                                    Some(match acc {
                                        Some(a) => worst(&a, s),
                                        None => s.clone(),
                                    })
                                })
                                .map(|s| (k, s))
                        })
                        .collect();
                    f.ack(&these).await;
                    metrics.set("dpucp_fpm_feedback_total", &[], f.feedback_sent as f64);
                }
            }
            ev = async {
                match frr.as_mut() {
                    Some(f) => f.events.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(f) = frr.as_mut() else { continue };
                match ev {
                    Some(ServerEvent::Connected { peer, connection }) => {
                        tracing::info!(%peer, connection, "zebra connected; it replays its RIB");
                        metrics.add("dpucp_fpm_connections_total", &[], 1.0);
                        fpm_health(&metrics, &f.server.counters());
                        // Nothing is removed until this connection has delivered its replay.
                        f.replay.connected(connection, &mut f.rib);
                        // A new connection: zebra keeps old flags, but which ones we cannot
                        // know; what was acknowledged on the last one counts for nothing.
                        f.rib.forget_feedback();
                    }
                    Some(ServerEvent::Events(evs)) => {
                        metrics.add("dpucp_fpm_messages_total", &[], evs.len() as f64);
                        f.rib.apply_all(&evs, &f.attr, &mut batch);
                        // The replay's quiet timer starts at its first route or nexthop.
                        f.replay.events(&evs, tokio::time::Instant::now());
                        if f.flush(&mut batch, &mut desired).await {
                            // A snapshot costs O(routes) and zebra streams thousands of small
                            // batches: publish at most every 10 ms, or 4× what the last copy
                            // took, so copies stay under a fifth of this loop's time.
                            let gap = Duration::from_millis(10).max(publish_cost * 4);
                            publish_at.get_or_insert_with(|| tokio::time::Instant::now() + gap);
                        }
                    }
                    Some(ServerEvent::Disconnected { connection, reason }) => {
                        fpm_health(&metrics, &f.server.counters());
                        match f.replay.disconnected(connection) {
                            ReplayEnd::Complete => {
                                tracing::warn!(connection, ?reason, "zebra disconnected");
                            }
                            ReplayEnd::NothingDelivered => tracing::warn!(connection, ?reason,
                                "FPM connection closed before sending any route; routes kept"),
                            ReplayEnd::Incomplete => tracing::warn!(connection, ?reason,
                                "zebra disconnected mid-replay; routes kept, the next complete replay sweeps the stale ones"),
                        }
                    }
                    Some(ServerEvent::Refused { peer, active }) => {
                        // The server logged it at WARN; zebra's connection goes on.
                        tracing::debug!(%peer, active, "FPM connection refused");
                        metrics.add("dpucp_fpm_refused_connections_total", &[], 1.0);
                    }
                    None => {
                        tracing::error!("FPM server stopped");
                        frr = None;
                    }
                }
            }
            _ = async {
                match resync_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(f) = frr.as_mut() {
                    // Events still queued are zebra talking: they push the deadline on.
                    let queued = !f.events.is_empty();
                    if !f.replay.quiet(tokio::time::Instant::now(), queued, &mut f.rib, &f.attr, &mut batch) {
                        continue;
                    }
                    if f.flush(&mut batch, &mut desired).await {
                        let _ = desired_tx.send(Arc::new(desired.model().clone()));
                    }
                    if let Some((addrs, tx)) = held_links.take() {
                        hold_until = None;
                        tracing::info!("zebra's replay is over; starting the DPU links");
                        let _ = desired_tx.send(Arc::new(desired.model().clone()));
                        links = start_links(addrs, tx);
                    }
                    // zebra keeps old flags across reconnects: acknowledge again every route it
                    // replayed, except what this connection was already told (`ack` skips it).
                    let refused = desired.refused();
                    let mut all: Vec<(RouteKey, OffloadStatus)> = route_statuses(&statuses)
                        .into_iter()
                        .filter(|(k, _)| !refused.contains_key(k))
                        .collect();
                    all.extend(desired.refused().iter().map(|(k, e)| {
                        (*k, OffloadStatus::Failed { reason: FailReason::Invalid(e.clone()) })
                    }));
                    let sent = f.ack(&all).await;
                    tracing::info!(routes = all.len(), sent, "zebra replay over; acknowledged again the routes not yet acknowledged on this connection");
                    metrics.set("dpucp_fpm_feedback_total", &[], f.feedback_sent as f64);
                }
            }
            _ = async {
                match publish_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                publish_at = None;
                let t = std::time::Instant::now();
                let _ = desired_tx.send(Arc::new(desired.model().clone()));
                publish_cost = t.elapsed();
            }
            _ = async {
                match hold_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                hold_until = None;
                if let Some((addrs, tx)) = held_links.take() {
                    tracing::warn!("zebra's replay did not complete within the startup hold; starting the DPU links without it");
                    let _ = desired_tx.send(Arc::new(desired.model().clone()));
                    links = start_links(addrs, tx);
                }
            }
            _ = sweep.tick() => {
                sweep_statuses(&mut statuses, desired.model(), &metrics, &writer);
            }
            _ = health.tick() => {
                if let Some(f) = frr.as_mut() {
                    fpm_health(&metrics, &f.server.counters());
                    for (code, n) in f.refused.counts() {
                        metrics.set("dpucp_frr_routes_refused", &[("reason", code)], n as f64);
                    }
                    f.refusal_summary();
                }
            }
            _ = drift.tick(), if interfaces.is_some() => {
                if let Some(i) = interfaces.as_mut() {
                    i.reconcile(desired.config(), true).await;
                }
            }
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    for l in links {
        let _ = l.await;
    }
    if let Some(f) = frr {
        f.server.shutdown().await;
    }
    for (_, lease) in leases {
        let _ = lease.revoke(&store).await;
    }
    let _ = probe_task.await;
    let _ = metrics_task.await;
    match api_task.await {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "API task failed"),
    }
    Ok(())
}

/// The FPM health metrics, from the server's own counters: whether zebra's socket is open,
/// and the framing and decode errors by kind.
fn fpm_health(metrics: &Metrics, c: &crate::fpm::FpmCounters) {
    metrics.set(
        "dpucp_fpm_connected",
        &[],
        if c.live.is_some() { 1.0 } else { 0.0 },
    );
    for (kind, n) in c.decode_errors() {
        metrics.set(
            "dpucp_fpm_decode_errors_total",
            &[("kind", kind.as_str())],
            n as f64,
        );
    }
}

fn describe_metrics(m: &Metrics) {
    m.describe(
        "dpucp_fpm_feedback_total",
        Kind::Counter,
        "Offload statuses sent back to zebra (one per route and status change, and after a reconnect one per route not yet acknowledged on the new connection).",
    );
    m.describe(
        "dpucp_fpm_connected",
        Kind::Gauge,
        "Whether zebra's FPM connection is up (its socket open), as the FPM server sees it.",
    );
    m.describe(
        "dpucp_fpm_messages_total",
        Kind::Counter,
        "Netlink messages from zebra decoded into route, nexthop or neighbour events (dropped ones are not counted).",
    );
    m.describe(
        "dpucp_fpm_decode_errors_total",
        Kind::Counter,
        "FPM input errors by kind: frame (the stream could not be framed; the connection is reset), message (an undecodable netlink message, dropped), attribute (an undecodable attribute; its message is dropped).",
    );
    m.describe(
        "dpucp_frr_routes_refused",
        Kind::Gauge,
        "Routes zebra sent that are on no DPU now, by reason code (connected, no_port, no_table, ..., invalid: refused by the model). dpuctl status lists them.",
    );
    m.describe(
        "dpucp_dpu_link_up",
        Kind::Gauge,
        "Whether the link to the DPU agent is up (0 from the start for every configured DPU).",
    );
    m.describe(
        "dpucp_fpm_connections_total",
        Kind::Counter,
        "FPM connections accepted as zebra's.",
    );
    m.describe(
        "dpucp_fpm_refused_connections_total",
        Kind::Counter,
        "FPM connections refused because zebra's connection was alive.",
    );
    m.describe(
        "dpucp_etcd_up",
        Kind::Gauge,
        "Whether etcd answered the last probe (a linearizable read every 2 s, 1 s timeout).",
    );
    m.describe(
        "dpucp_etcd_revision",
        Kind::Gauge,
        "The etcd revision of the desired state in force.",
    );
    m.describe(
        "dpucp_dpu_up",
        Kind::Gauge,
        "Same as dpucp_dpu_link_up (the older name, kept for existing dashboards).",
    );
    m.describe(
        "dpucp_objects",
        Kind::Gauge,
        "Objects per DPU, kind and where they landed.",
    );
    m.describe(
        "dpucp_batches_total",
        Kind::Counter,
        "Batches acknowledged or refused by DPUs.",
    );
    m.describe(
        "dpucp_route_packets_total",
        Kind::Counter,
        "Packets per route reported by DPUs.",
    );
}

fn kind_of(k: &ObjectKey) -> &'static str {
    match k {
        ObjectKey::Node => "node",
        ObjectKey::Vpc(_) => "vpc",
        ObjectKey::Route(_) => "route",
        ObjectKey::Nat(_) => "nat",
        ObjectKey::Meter(_) => "meter",
    }
}

fn where_of(s: &OffloadStatus) -> &'static str {
    match s {
        OffloadStatus::Offloaded => "offloaded",
        OffloadStatus::Software { .. } => "software",
        OffloadStatus::Failed { .. } => "failed",
    }
}

/// An etcd status write, done by the status writer task off the daemon's main loop (zebra's
/// acknowledgements must not wait for etcd). One task: writes stay in order.
enum StatusJob {
    Put {
        dpu: Name,
        lease: i64,
        items: Vec<(ObjectKey, OffloadStatus)>,
    },
    Clear {
        dpu: Name,
        keys: Vec<ObjectKey>,
    },
}

/// Statuses pending at once above which the writer treats them as a burst.
const STATUS_BURST: usize = 2048;
/// In a burst, the writer waits for this much quiet before writing...
const STATUS_QUIET: Duration = Duration::from_millis(200);
/// ...but never holds a status longer than this.
const STATUS_MAX_DELAY: Duration = Duration::from_secs(5);

/// A DPU's statuses waiting for the writer: its lease, and per object a status to put or
/// `None` to delete.
type PendingStatus = (Option<i64>, BTreeMap<ObjectKey, Option<OffloadStatus>>);

/// What the writer last stored for a DPU, under which lease.
#[derive(Default)]
struct Written {
    lease: i64,
    statuses: BTreeMap<ObjectKey, OffloadStatus>,
}

/// The etcd status mirror. Statuses are coalesced (the newest per object wins), and a status
/// equal to the one already stored is not written again (re-acknowledgements after a
/// reconnect). A burst (a full table) is held until it goes quiet, at most
/// [`STATUS_MAX_DELAY`]: the DPUs' acknowledgements to zebra come first, and etcd's work on
/// the same cores would only delay them. Small updates are written at once.
fn status_writer(store: Store) -> mpsc::UnboundedSender<StatusJob> {
    let (tx, mut rx) = mpsc::unbounded_channel::<StatusJob>();
    tokio::spawn(async move {
        let mut written: BTreeMap<Name, Written> = BTreeMap::new();
        while let Some(first) = rx.recv().await {
            // dpu -> (lease, object -> Some(status) to put | None to delete)
            let mut pending: BTreeMap<Name, PendingStatus> = BTreeMap::new();
            let mut count = 0usize;
            let mut add = |job: StatusJob, count: &mut usize| match job {
                StatusJob::Put { dpu, lease, items } => {
                    let e = pending.entry(dpu).or_default();
                    e.0 = Some(lease);
                    for (k, st) in items {
                        if e.1.insert(k, Some(st)).is_none() {
                            *count += 1;
                        }
                    }
                }
                StatusJob::Clear { dpu, keys } => {
                    let e = pending.entry(dpu).or_default();
                    for k in keys {
                        if e.1.insert(k, None).is_none() {
                            *count += 1;
                        }
                    }
                }
            };
            add(first, &mut count);
            let since = tokio::time::Instant::now();
            loop {
                while let Ok(job) = rx.try_recv() {
                    add(job, &mut count);
                }
                if count < STATUS_BURST || since.elapsed() >= STATUS_MAX_DELAY {
                    break;
                }
                let left = STATUS_MAX_DELAY.saturating_sub(since.elapsed());
                match tokio::time::timeout(STATUS_QUIET.min(left), rx.recv()).await {
                    Ok(Some(job)) => add(job, &mut count),
                    Ok(None) | Err(_) => break, // closed, or quiet
                }
            }
            for (dpu, (lease, items)) in pending {
                let w = written.entry(dpu.clone()).or_default();
                if let Some(l) = lease {
                    if l != w.lease {
                        // A new lease: what was stored under the old one is gone with it.
                        *w = Written {
                            lease: l,
                            statuses: BTreeMap::new(),
                        };
                    }
                }
                let mut puts = Vec::new();
                let mut deletes = Vec::new();
                for (k, st) in items {
                    match st {
                        Some(st) if w.statuses.get(&k) != Some(&st) => puts.push((k, st)),
                        Some(_) => {}
                        None => deletes.push(k),
                    }
                }
                // Written in slices: one etcd transaction holds a bounded number of operations.
                for chunk in puts.chunks(100) {
                    match store.put_status(&dpu, chunk, Some(w.lease)).await {
                        Ok(_) => {
                            for (k, st) in chunk {
                                w.statuses.insert(k.clone(), st.clone());
                            }
                        }
                        Err(e) => {
                            tracing::warn!(dpu = %dpu, error = %e, "cannot write status to etcd");
                            break;
                        }
                    }
                }
                for chunk in deletes.chunks(100) {
                    match store.clear_status(&dpu, chunk).await {
                        Ok(_) => {
                            for k in chunk {
                                w.statuses.remove(k);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(dpu = %dpu, error = %e, "cannot clear status in etcd");
                            break;
                        }
                    }
                }
            }
        }
    });
    tx
}

/// Every couple of seconds: drops the statuses of objects no longer desired (here and in
/// etcd), and counts objects per placement for Prometheus. O(statuses), so not per batch.
fn sweep_statuses(
    statuses: &mut BTreeMap<String, BTreeMap<ObjectKey, OffloadStatus>>,
    desired: &Model,
    metrics: &Metrics,
    writer: &mpsc::UnboundedSender<StatusJob>,
) {
    for (dpu, map) in statuses.iter_mut() {
        let stale: Vec<ObjectKey> = map
            .keys()
            .filter(|k| !desired.contains(k))
            .cloned()
            .collect();
        for k in &stale {
            map.remove(k);
        }
        if !stale.is_empty() {
            if let Ok(id) = Name::new(dpu) {
                let _ = writer.send(StatusJob::Clear {
                    dpu: id,
                    keys: stale,
                });
            }
        }
        let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (k, s) in map.iter() {
            *counts.entry((kind_of(k), where_of(s))).or_default() += 1;
        }
        metrics.remove_matching("dpucp_objects", "dpu", dpu);
        for ((kind, place), n) in counts {
            metrics.set(
                "dpucp_objects",
                &[("dpu", dpu), ("kind", kind), ("where", place)],
                n as f64,
            );
        }
    }
}

#[allow(clippy::too_many_arguments)] // the daemon's state, borrowed piecewise
async fn on_dpu_event(
    ev: DpuEvent,
    store: &Store,
    metrics: &Metrics,
    leases: &mut BTreeMap<String, DpuLease>,
    statuses: &mut BTreeMap<String, BTreeMap<ObjectKey, OffloadStatus>>,
    desired: &Model,
    writer: &mpsc::UnboundedSender<StatusJob>,
    pairs: &crate::pair::PairStates,
) {
    match ev {
        DpuEvent::Connected { hello, restarted } => {
            metrics.set("dpucp_dpu_link_up", &[("dpu", &hello.dpu_id)], 1.0);
            metrics.set("dpucp_dpu_up", &[("dpu", &hello.dpu_id)], 1.0);
            let Ok(id) = Name::new(&hello.dpu_id) else {
                tracing::warn!(dpu = %hello.dpu_id, "DPU id is not a valid name; not registered");
                return;
            };
            let record = DpuRecord {
                id,
                agent_version: hello.agent_version.clone(),
                ports: hello
                    .ports
                    .iter()
                    .map(|(p, c)| PortCaps {
                        port: *p,
                        caps: c.source,
                    })
                    .collect(),
            };
            match store.register_dpu(&record, 10).await {
                Ok(lease) => {
                    leases.insert(hello.dpu_id.clone(), lease);
                }
                Err(e) => {
                    tracing::warn!(dpu = %hello.dpu_id, error = %e, "cannot register DPU in etcd")
                }
            }
            if restarted {
                statuses.remove(&hello.dpu_id);
            }
        }
        DpuEvent::Acked {
            dpu, full, status, ..
        } => {
            metrics.add(
                "dpucp_batches_total",
                &[("dpu", &dpu), ("result", "acked")],
                1.0,
            );
            let map = statuses.entry(dpu.clone()).or_default();
            if full {
                map.clear();
            }
            for (k, s) in &status {
                map.insert(k.clone(), s.clone());
            }
            // Statuses of objects deleted since go in the periodic sweep (`sweep_statuses`):
            // an acknowledgement names what a batch touched, not what it deleted.
            if let (Ok(id), Some(lease)) = (Name::new(&dpu), leases.get(&dpu)) {
                let current: Vec<(ObjectKey, OffloadStatus)> = status
                    .into_iter()
                    .filter(|(k, _)| desired.contains(k))
                    .collect();
                let _ = writer.send(StatusJob::Put {
                    dpu: id,
                    lease: lease.lease_id(),
                    items: current,
                });
            }
        }
        DpuEvent::Refused { dpu, batch, reason } => {
            metrics.add(
                "dpucp_link_refusals_total",
                &[
                    ("dpu", &dpu),
                    ("by", "dpu"),
                    ("reason", refusal_kind(&reason)),
                ],
                1.0,
            );
            if let Some((epoch, full)) = batch {
                metrics.add(
                    "dpucp_batches_total",
                    &[("dpu", &dpu), ("result", "refused")],
                    1.0,
                );
                tracing::warn!(dpu = %dpu, epoch, full, %reason, "DPU refused a batch of the desired state");
            }
        }
        DpuEvent::RefusedFromDpu { dpu, reason } => {
            metrics.add(
                "dpucp_link_refusals_total",
                &[
                    ("dpu", &dpu),
                    ("by", "host"),
                    ("reason", refusal_kind(&reason)),
                ],
                1.0,
            );
        }
        DpuEvent::Unanswered { dpu, .. } => {
            metrics.add(
                "dpucp_batches_total",
                &[("dpu", &dpu), ("result", "unanswered")],
                1.0,
            );
        }
        DpuEvent::Pair { dpu, status } => {
            use flow_offload::wire::PairRole;
            let l: &[(&str, &str)] = &[("dpu", &dpu)];
            let role = match status.role {
                PairRole::Standby => 0.0,
                PairRole::Active => 1.0,
                PairRole::Fenced => 2.0,
            };
            metrics.set("dpucp_pair_role", l, role);
            metrics.set("dpucp_pair_epoch", l, status.epoch as f64);
            metrics.set("dpucp_pair_ready", l, f64::from(u8::from(status.ready)));
            metrics.set("dpucp_pair_lag_events", l, status.lag_events as f64);
            metrics.set("dpucp_pair_lag_seconds", l, status.lag_ms as f64 / 1000.0);
            metrics.set("dpucp_pair_sessions", l, status.sessions as f64);
            metrics.set(
                "dpucp_pair_peer_connected",
                l,
                f64::from(u8::from(status.peer_connected)),
            );
            pairs
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(dpu, status);
        }
        DpuEvent::Counters { dpu, counters } => {
            for (k, packets, _) in counters.routes {
                let route = format!("{}:{}", k.table.0, k.prefix);
                metrics.set(
                    "dpucp_route_packets_total",
                    &[("dpu", &dpu), ("route", &route)],
                    packets as f64,
                );
            }
        }
        DpuEvent::Disconnected { dpu, reason } => {
            if let Some(d) = dpu {
                // Its pair report is no longer true.
                let was_member = pairs
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&d)
                    .is_some();
                if was_member {
                    metrics.set("dpucp_pair_peer_connected", &[("dpu", &d)], 0.0);
                    metrics.set("dpucp_pair_ready", &[("dpu", &d)], 0.0);
                }
                metrics.set("dpucp_dpu_link_up", &[("dpu", &d)], 0.0);
                metrics.set("dpucp_dpu_up", &[("dpu", &d)], 0.0);
                tracing::warn!(dpu = %d, %reason, "DPU link down");
                if let Some(lease) = leases.remove(&d) {
                    let _ = lease.revoke(store).await;
                }
            }
        }
    }
}

/// A DPU link to start: the agent's address, and its pair membership.
type LinkTarget = (
    SocketAddr,
    Option<(
        crate::pair::Member,
        crate::pair::Timing,
        mpsc::Receiver<u64>,
    )>,
);

/// A refusal's kind, as a metric label.
fn refusal_kind(r: &flow_offload::wire::Refusal) -> &'static str {
    use flow_offload::wire::Refusal;
    match r {
        Refusal::Model(_) => "model",
        Refusal::Undecodable { .. } => "undecodable",
        Refusal::Incompatible { .. } => "incompatible",
        Refusal::Unexpected(_) => "unexpected",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn every_listener_beyond_loopback_is_refused_naming_its_field() {
        let good = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n[api]\nlisten = \"127.0.0.1:50051\"\n[metrics]\nlisten = \"[::1]:9100\"\n[fpm]\nlisten = \"127.0.0.1:2620\"\n[images]\nlisten = \"127.0.0.1:0\"\n";
        assert!(Config::parse(good).is_ok());
        for (from, to, field) in [
            ("127.0.0.1:50051", "0.0.0.0:50051", "api.listen"),
            ("[::1]:9100", "[::]:9100", "metrics.listen"),
            ("127.0.0.1:2620", "10.0.0.1:2620", "fpm.listen"),
            ("127.0.0.1:0", "0.0.0.0:0", "images.listen"),
        ] {
            match Config::parse(&good.replace(from, to)) {
                Err(ConfigError::Invalid { field: f, problem }) => {
                    assert_eq!(f, field);
                    assert!(problem.contains("not a loopback address"), "{problem}");
                }
                other => panic!("{to}: {other:?}"),
            }
        }
        // Chunk servers default to loopback too.
        let c = Config::parse(&good.replace("[images]\nlisten = \"127.0.0.1:0\"\n", "[images]\n"))
            .unwrap();
        assert_eq!(c.images.unwrap().listen, "127.0.0.1:0");
    }

    fn via_port0(prefix: &str) -> Route {
        Route {
            key: RouteKey {
                table: UNDERLAY_TABLE,
                prefix: prefix.parse().unwrap(),
            },
            nexthops: vec![flow_offload::model::Nexthop::Underlay {
                gateway: "192.0.2.2".parse().unwrap(),
                port: PortId(0),
                mac: flow_offload::model::MacAddr([2, 0, 0, 0, 0, 2]),
            }],
        }
    }

    fn node_with_uplink0() -> Change {
        Change::SetNode(flow_offload::model::Node {
            vtep: "192.0.2.1".parse().unwrap(),
            router_mac: flow_offload::model::MacAddr([2, 0, 0, 0, 0, 1]),
            uplinks: [PortId(0)].into_iter().collect(),
        })
    }

    /// The model's refusals are reported with the model's own error, and cleared when the
    /// configuration makes the route valid, when a configured route shadows it, or when zebra
    /// deletes it.
    #[test]
    fn unit_desired_reports_refusals_with_the_models_reason_and_clears_them() {
        let mut d = Desired::default();
        let _ = d.set_config(Model::default());
        let r = via_port0("10.5.0.0/24");
        let k = r.key;
        let v = d.frr_routes(vec![r.clone()], vec![]);
        assert_eq!(v.refused.len(), 1);
        let (key, e) = &v.refused[0];
        assert_eq!(*key, k);
        assert!(
            e.to_string().contains("port 0 (not an uplink)"),
            "the model's reason, not a made-up one: {e}"
        );
        assert!(!d.model().contains(&ObjectKey::Route(k)));
        assert_eq!(d.refused().len(), 1);
        // The same route again: still refused, the same reason.
        let v = d.frr_routes(vec![r.clone()], vec![]);
        assert_eq!(v.refused.len(), 1);
        // The node gets its uplink: the route is valid now.
        let v = d.config_changes(&[node_with_uplink0()]);
        assert_eq!(
            v,
            Verdicts {
                refused: vec![],
                cleared: vec![k]
            }
        );
        assert!(d.model().contains(&ObjectKey::Route(k)));
        // A refused update withdraws the version in force.
        let mut bad = r.clone();
        bad.nexthops = vec![flow_offload::model::Nexthop::Underlay {
            gateway: "192.0.2.2".parse().unwrap(),
            port: PortId(7),
            mac: flow_offload::model::MacAddr([2, 0, 0, 0, 0, 2]),
        }];
        let v = d.frr_routes(vec![bad], vec![]);
        assert_eq!(v.refused.len(), 1);
        assert!(!d.model().contains(&ObjectKey::Route(k)));
        // zebra deletes it: no longer refused.
        let v = d.frr_routes(vec![], vec![k]);
        assert_eq!(v.cleared, vec![k]);
        assert!(d.refused().is_empty());
        // A configured route for the prefix shadows FRR's: not refused.
        let _ = d.config_changes(&[Change::UpsertRoute(via_port0("10.6.0.0/24"))]);
        let mut shadowed = via_port0("10.6.0.0/24");
        shadowed.nexthops = vec![flow_offload::model::Nexthop::Blackhole];
        let v = d.frr_routes(vec![shadowed], vec![]);
        assert_eq!(v, Verdicts::default());
        // The configuration loses its node: the FRR route in force is refused now.
        let _ = d.frr_routes(vec![via_port0("10.7.0.0/24")], vec![]);
        let mut config = d.config().clone();
        config
            .apply(&[Change::DeleteRoute(RouteKey {
                table: UNDERLAY_TABLE,
                prefix: "10.6.0.0/24".parse().unwrap(),
            })])
            .unwrap();
        let mut no_uplink = config.clone();
        no_uplink
            .apply(&[Change::SetNode(flow_offload::model::Node {
                vtep: "192.0.2.1".parse().unwrap(),
                router_mac: flow_offload::model::MacAddr([2, 0, 0, 0, 0, 1]),
                uplinks: Default::default(),
            })])
            .unwrap();
        let v = d.set_config(no_uplink);
        let refused: Vec<String> = v
            .refused
            .iter()
            .map(|(k, _)| k.prefix.to_string())
            .collect();
        assert_eq!(refused, vec!["10.7.0.0/24"]);
        // Unshadowed, FRR's blackhole for 10.6.0.0/24 is in force (it needs no uplink).
        assert_eq!(
            d.model()
                .routes()
                .get(&RouteKey {
                    table: UNDERLAY_TABLE,
                    prefix: "10.6.0.0/24".parse().unwrap(),
                })
                .map(|r| r.nexthops.clone()),
            Some(vec![flow_offload::model::Nexthop::Blackhole])
        );
    }

    #[test]
    fn show_vrf_output_gives_vrf_ids() {
        // FRR 10.3's `show vrf` with the netns backend.
        let out = "netns-based vrfs\nvrf blue id 1 netns /run/netns/blue (configured)\nvrf red id 2 netns /run/netns/red\ninactive\n";
        let ids = parse_show_vrf(out);
        assert_eq!(ids.len(), 2);
        assert_eq!(ids["blue"], 1);
        assert_eq!(ids["red"], 2);
        assert!(parse_show_vrf("% Unknown command\n").is_empty());
    }
}
