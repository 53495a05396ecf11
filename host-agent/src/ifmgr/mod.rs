//! The interface manager: for each VPC, what FRR needs to run EVPN type-5 for it.
//!
//! Per VPC with L3 VNI N:
//! - **VRF-device backend** (production kernels): a `vrf` device named after the VPC, bound to
//!   the VPC's table; a bridge `brN` enslaved to it (the SVI, carrying the node's router MAC,
//!   which FRR advertises as the RMAC); a VXLAN device `vxN` (id N, local = the node's VTEP,
//!   port 4789, no learning) enslaved to the bridge.
//! - **Network-namespace backend** (FRR's netns VRFs, zebra `-w`; used where the kernel has no
//!   VRF devices, as on these machines): a namespace named after the VPC, bound under the
//!   configured directory, holding the bridge and the VXLAN device. The VXLAN device is created
//!   in the agent's own namespace and then moved, so its UDP socket stays in the underlay.
//!
//! Reconcile = plan (pure) → observe (netlink dumps) → diff (pure, per device) → apply. What
//! is already right is never touched: a correct device keeps its ifindex.

mod rtnl;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use flow_offload::model::Model;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVrf, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use serde::Deserialize;

use rtnl::Rtnl;
pub use rtnl::RtnlError;

/// The VXLAN UDP port.
pub const VXLAN_PORT: u16 = 4789;

/// `[interfaces]` in the host agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfacesSection {
    /// `"auto"` (default), `"vrf-device"` or `"netns"`.
    #[serde(default)]
    pub backend: Option<String>,
    /// Where the netns backend binds VRF namespaces (default `/run/netns`, where `ip netns` and
    /// zebra `-w` look).
    #[serde(default)]
    pub netns_dir: Option<String>,
}

/// How VRFs are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Linux VRF devices.
    VrfDevice,
    /// One network namespace per VRF, bound in this directory.
    Netns {
        /// The directory.
        dir: PathBuf,
    },
}

/// A configuration or set-up error.
#[derive(Debug, thiserror::Error)]
pub enum IfmgrError {
    /// A bad configuration value.
    #[error("interfaces.{field}: {problem}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// VRF devices were asked for, and this kernel has none.
    #[error("interfaces.backend: \"vrf-device\", but this kernel cannot create VRF devices ({0})")]
    NoVrfDevices(RtnlError),
    /// A netlink or namespace operation failed.
    #[error(transparent)]
    Rtnl(#[from] RtnlError),
}

impl Backend {
    /// The backend a configuration asks for; `auto` probes whether the kernel accepts a VRF
    /// device (in a throwaway namespace) and says which it chose, and why, in the log.
    pub fn from_config(c: &InterfacesSection) -> Result<Backend, IfmgrError> {
        let dir = PathBuf::from(c.netns_dir.as_deref().unwrap_or("/run/netns"));
        if !dir.is_absolute() {
            return Err(IfmgrError::Config {
                field: "netns_dir",
                problem: "must be an absolute path",
            });
        }
        match c.backend.as_deref().unwrap_or("auto") {
            "netns" => Ok(Backend::Netns { dir }),
            "vrf-device" => match probe_vrf_devices() {
                Ok(()) => Ok(Backend::VrfDevice),
                Err(e) => Err(IfmgrError::NoVrfDevices(e)),
            },
            "auto" => match probe_vrf_devices() {
                Ok(()) => {
                    tracing::info!("VRF backend: VRF devices (the kernel accepts them)");
                    Ok(Backend::VrfDevice)
                }
                Err(e) => {
                    tracing::info!(dir = %dir.display(), reason = %e,
                        "VRF backend: one network namespace per VRF (the kernel has no VRF devices); run zebra with -w");
                    Ok(Backend::Netns { dir })
                }
            },
            _ => Err(IfmgrError::Config {
                field: "backend",
                problem: "must be \"auto\", \"vrf-device\" or \"netns\"",
            }),
        }
    }
}

/// Tries to create a VRF device in a throwaway namespace.
fn probe_vrf_devices() -> Result<(), RtnlError> {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
            RtnlError::Sys {
                what: "unshare",
                source,
            }
        })?;
        let mut nl = Rtnl::open()?;
        nl.create_link("probe vrf device", vrf_request("dpucpprobe", 4242))
    })
    .join()
    .map_err(|_| RtnlError::Thread)?
}

/// What one VPC needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcInterfaces {
    /// The VPC (and VRF) name.
    pub vpc: String,
    /// Its L3 VNI.
    pub vni: u32,
    /// Its VRF table.
    pub table: u32,
    /// The node's VTEP.
    pub vtep: Ipv4Addr,
    /// The node's router MAC.
    pub router_mac: [u8; 6],
}

impl VpcInterfaces {
    /// The bridge (SVI).
    pub fn bridge(&self) -> String {
        format!("br{}", self.vni)
    }

    /// The VXLAN device.
    pub fn vxlan(&self) -> String {
        format!("vx{}", self.vni)
    }
}

/// What the configuration asks for, by VPC name (nothing before the node is set: no VTEP).
pub fn plan(model: &Model) -> BTreeMap<String, VpcInterfaces> {
    let Some(node) = model.node() else {
        return BTreeMap::new();
    };
    model
        .vpcs()
        .values()
        .map(|v| {
            (
                v.name.to_string(),
                VpcInterfaces {
                    vpc: v.name.to_string(),
                    vni: v.vni.get(),
                    table: v.table.0,
                    vtep: node.vtep,
                    router_mac: node.router_mac.0,
                },
            )
        })
        .collect()
}

/// A device as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// ifindex (in its namespace).
    pub index: u32,
    /// Administratively up.
    pub up: bool,
    /// MAC.
    pub mac: Vec<u8>,
    /// Its master's ifindex.
    pub master: Option<u32>,
    /// Kind-specific facts.
    pub kind: FoundKind,
}

/// What kind of device it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FoundKind {
    /// A bridge.
    Bridge,
    /// A VXLAN device.
    Vxlan {
        /// VNI.
        vni: Option<u32>,
        /// Local address.
        local: Option<Ipv4Addr>,
        /// UDP port.
        port: Option<u16>,
    },
    /// A VRF device.
    Vrf {
        /// Its table.
        table: Option<u32>,
    },
    /// Anything else.
    Other,
}

/// One VPC's devices as found (by name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FoundVpc {
    /// The VRF device (VRF-device backend).
    pub vrf: Option<Found>,
    /// The bridge.
    pub bridge: Option<Found>,
    /// The VXLAN device.
    pub vxlan: Option<Found>,
}

/// One change to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create the VRF namespace (netns backend).
    CreateNamespace,
    /// Create the VRF device.
    CreateVrf,
    /// Delete a device that is wrong in a way that cannot be changed in place.
    Delete(&'static str),
    /// Bring the VRF device up.
    VrfUp,
    /// Create the bridge with the router MAC.
    CreateBridge,
    /// Set the bridge's MAC.
    BridgeMac,
    /// Enslave the bridge to the VRF device.
    BridgeIntoVrf,
    /// Bring the bridge up.
    BridgeUp,
    /// Create the VXLAN device (and, netns backend, move it into the namespace).
    CreateVxlan,
    /// Enslave the VXLAN device to the bridge.
    VxlanIntoBridge,
    /// Bring the VXLAN device up.
    VxlanUp,
}

/// The steps that make `found` what `want` asks for (empty: already right).
pub fn diff(
    want: &VpcInterfaces,
    found: &FoundVpc,
    backend: &Backend,
    ns_exists: bool,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let vrf_dev = *backend == Backend::VrfDevice;
    if !vrf_dev && !ns_exists {
        steps.push(Step::CreateNamespace);
    }
    let mut vrf_index_known = true;
    if vrf_dev {
        match &found.vrf {
            Some(f)
                if f.kind
                    == (FoundKind::Vrf {
                        table: Some(want.table),
                    }) =>
            {
                if !f.up {
                    steps.push(Step::VrfUp);
                }
            }
            Some(_) => {
                steps.extend([Step::Delete("vrf"), Step::CreateVrf, Step::VrfUp]);
                vrf_index_known = false;
            }
            None => {
                steps.extend([Step::CreateVrf, Step::VrfUp]);
                vrf_index_known = false;
            }
        }
    }
    let mut bridge_new = false;
    match &found.bridge {
        Some(f) if f.kind == FoundKind::Bridge => {
            if f.mac != want.router_mac {
                steps.push(Step::BridgeMac);
            }
            if vrf_dev && (!vrf_index_known || f.master != found.vrf.as_ref().map(|v| v.index)) {
                steps.push(Step::BridgeIntoVrf);
            }
            if !f.up {
                steps.push(Step::BridgeUp);
            }
        }
        other => {
            if other.is_some() {
                steps.push(Step::Delete("bridge"));
            }
            steps.push(Step::CreateBridge);
            if vrf_dev {
                steps.push(Step::BridgeIntoVrf);
            }
            steps.push(Step::BridgeUp);
            bridge_new = true;
        }
    }
    let right_vxlan = FoundKind::Vxlan {
        vni: Some(want.vni),
        local: Some(want.vtep),
        port: Some(VXLAN_PORT),
    };
    match &found.vxlan {
        Some(f) if f.kind == right_vxlan => {
            if bridge_new || f.master != found.bridge.as_ref().map(|b| b.index) {
                steps.push(Step::VxlanIntoBridge);
            }
            if !f.up {
                steps.push(Step::VxlanUp);
            }
        }
        other => {
            if other.is_some() {
                steps.push(Step::Delete("vxlan"));
            }
            steps.extend([Step::CreateVxlan, Step::VxlanIntoBridge, Step::VxlanUp]);
        }
    }
    steps
}

pub(crate) fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// A request that sets `IFF_UP` on link `index`.
pub(crate) fn up_request(index: u32) -> LinkMessage {
    let mut l = LinkMessage::default();
    l.header.index = index;
    l.header.flags = LinkFlags::Up;
    l.header.change_mask = LinkFlags::Up;
    l
}

fn named(name: &str, kind: InfoKind, data: Option<InfoData>) -> LinkMessage {
    let mut l = LinkMessage::default();
    l.attributes.push(LinkAttribute::IfName(name.to_owned()));
    let mut info = vec![LinkInfo::Kind(kind)];
    if let Some(d) = data {
        info.push(LinkInfo::Data(d));
    }
    l.attributes.push(LinkAttribute::LinkInfo(info));
    l
}

fn vrf_request(name: &str, table: u32) -> LinkMessage {
    named(
        name,
        InfoKind::Vrf,
        Some(InfoData::Vrf(vec![InfoVrf::TableId(table)])),
    )
}

fn found(l: &LinkMessage) -> Found {
    let mut f = Found {
        index: l.header.index,
        up: l.header.flags.contains(LinkFlags::Up),
        mac: Vec::new(),
        master: None,
        kind: FoundKind::Other,
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::Address(m) => f.mac = m.clone(),
            LinkAttribute::Controller(m) => f.master = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                let kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.clone()),
                    _ => None,
                });
                let data = infos.iter().find_map(|i| match i {
                    LinkInfo::Data(d) => Some(d),
                    _ => None,
                });
                f.kind = match (kind, data) {
                    (Some(InfoKind::Bridge), _) => FoundKind::Bridge,
                    (Some(InfoKind::Vxlan), d) => {
                        let mut k = (None, None, None);
                        if let Some(InfoData::Vxlan(v)) = d {
                            for x in v {
                                match x {
                                    InfoVxlan::Id(i) => k.0 = Some(*i),
                                    InfoVxlan::Local(a) => k.1 = Some(*a),
                                    InfoVxlan::Port(p) => k.2 = Some(*p),
                                    _ => {}
                                }
                            }
                        }
                        FoundKind::Vxlan {
                            vni: k.0,
                            local: k.1,
                            port: k.2,
                        }
                    }
                    (Some(InfoKind::Vrf), d) => FoundKind::Vrf {
                        table: match d {
                            Some(InfoData::Vrf(v)) => v.iter().find_map(|x| match x {
                                InfoVrf::TableId(t) => Some(*t),
                                _ => None,
                            }),
                            _ => None,
                        },
                    },
                    _ => FoundKind::Other,
                };
            }
            _ => {}
        }
    }
    f
}

/// One VPC's devices among `links`.
fn observe(links: &[LinkMessage], want: &VpcInterfaces) -> FoundVpc {
    let by = |name: &str| links.iter().find(|l| link_name(l) == Some(name)).map(found);
    FoundVpc {
        vrf: by(&want.vpc),
        bridge: by(&want.bridge()),
        vxlan: by(&want.vxlan()),
    }
}

/// The interfaces of this thread's network namespace, name → ifindex (as zebra names them
/// in its routes' `RTA_OIF`).
pub fn ifindexes() -> Result<BTreeMap<String, u32>, RtnlError> {
    Ok(Rtnl::open()?
        .links()?
        .iter()
        .filter_map(|l| link_name(l).map(|n| (n.to_owned(), l.header.index)))
        .collect())
}

/// What one reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Per VPC, the steps applied.
    pub changed: BTreeMap<String, Vec<Step>>,
    /// VPCs whose devices were removed.
    pub removed: Vec<String>,
}

/// The interface manager.
#[derive(Debug, Clone)]
pub struct InterfaceManager {
    backend: Backend,
}

impl InterfaceManager {
    /// A manager with this backend.
    pub fn new(backend: Backend) -> InterfaceManager {
        InterfaceManager { backend }
    }

    /// Its backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Makes the kernel match `want`: observe, diff, fix; removes the devices of VPCs no
    /// longer desired (only what looks like ours: a namespace or VRF device holding `brN` and
    /// `vxN`). Blocking (netlink, namespaces): call it from a blocking thread.
    pub fn reconcile(&self, want: &BTreeMap<String, VpcInterfaces>) -> Result<Report, IfmgrError> {
        match &self.backend {
            Backend::Netns { dir } => reconcile_netns(dir, want),
            Backend::VrfDevice => reconcile_vrf_devices(want),
        }
    }
}

fn is_ours(links: &[LinkMessage]) -> bool {
    let names: Vec<&str> = links.iter().filter_map(link_name).collect();
    let numbered = |p: &str| {
        names.iter().any(|n| {
            n.strip_prefix(p)
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    numbered("br") && numbered("vx")
}

fn reconcile_netns(
    dir: &Path,
    want: &BTreeMap<String, VpcInterfaces>,
) -> Result<Report, IfmgrError> {
    let mut report = Report::default();
    std::fs::create_dir_all(dir).map_err(|source| RtnlError::Namespace {
        path: dir.to_path_buf(),
        source,
    })?;
    // Namespaces of VPCs no longer desired.
    let present: Vec<String> = std::fs::read_dir(dir)
        .map_err(|source| RtnlError::Namespace {
            path: dir.to_path_buf(),
            source,
        })?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for name in present.iter().filter(|n| !want.contains_key(*n)) {
        let path = dir.join(name);
        let links = rtnl::in_netns(&path, || Rtnl::open()?.links())?;
        if is_ours(&links) {
            rtnl::delete_netns(&path)?;
            tracing::info!(vpc = %name, "VPC gone: its VRF namespace removed");
            report.removed.push(name.clone());
        }
    }
    for (name, w) in want {
        let path = dir.join(name);
        let exists = path.exists();
        let links = if exists {
            let p = path.clone();
            rtnl::in_netns(&p, || Rtnl::open()?.links())?
        } else {
            Vec::new()
        };
        let found = observe(&links, w);
        let steps = diff(
            w,
            &found,
            &Backend::Netns {
                dir: dir.to_path_buf(),
            },
            exists,
        );
        if steps.is_empty() {
            continue;
        }
        tracing::info!(vpc = %name, ?steps, "fixing the VPC's interfaces");
        apply_netns(&path, w, &found, &steps)?;
        report.changed.insert(name.clone(), steps);
    }
    Ok(report)
}

fn apply_netns(
    path: &Path,
    w: &VpcInterfaces,
    found: &FoundVpc,
    steps: &[Step],
) -> Result<(), IfmgrError> {
    if steps.contains(&Step::CreateNamespace) {
        rtnl::create_netns(path)?;
    }
    if steps.contains(&Step::CreateVxlan) {
        // Made here, in the underlay's namespace, then moved: its socket stays here.
        let tmp = format!("dpucp{}", w.vni);
        let mut nl = Rtnl::open()?;
        if let Some(old) = nl.links()?.iter().find(|l| link_name(l) == Some(&tmp)) {
            nl.delete_link("remove a half-made vxlan", old.header.index)?;
        }
        nl.create_link("create vxlan", vxlan_request(&tmp, w))?;
        let idx = nl
            .links()?
            .iter()
            .find(|l| link_name(l) == Some(&tmp))
            .map(|l| l.header.index)
            .ok_or(RtnlError::Parse {
                what: "vxlan just created",
                detail: "not found".to_owned(),
            })?;
        let ns = rtnl::open_netns(path)?;
        let mut mv = LinkMessage::default();
        mv.header.index = idx;
        mv.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        if let Some(old) = &found.vxlan {
            // A wrong one inside must go first, or the name clashes.
            let i = old.index;
            rtnl::in_netns(path, move || {
                Rtnl::open()?.delete_link("delete wrong vxlan", i)
            })?;
        }
        nl.set_link("move vxlan into the VRF namespace", mv)?;
    }
    let w2 = w.clone();
    let found2 = found.clone();
    let steps2: Vec<Step> = steps.to_vec();
    rtnl::in_netns(path, move || apply_inside(&w2, &found2, &steps2, true))?;
    Ok(())
}

/// The steps that happen in the VRF's namespace (netns) or the agent's own (VRF devices).
fn apply_inside(
    w: &VpcInterfaces,
    found: &FoundVpc,
    steps: &[Step],
    vxlan_moved_in: bool,
) -> Result<(), RtnlError> {
    let mut nl = Rtnl::open()?;
    let index_of = |nl: &mut Rtnl, name: &str| -> Result<u32, RtnlError> {
        nl.links()?
            .iter()
            .find(|l| link_name(l) == Some(name))
            .map(|l| l.header.index)
            .ok_or(RtnlError::Parse {
                what: "device lookup",
                detail: format!("{name} not found"),
            })
    };
    for s in steps {
        match s {
            Step::Delete(what) => {
                let f = match *what {
                    "vrf" => &found.vrf,
                    "bridge" => &found.bridge,
                    _ if vxlan_moved_in => &None, // deleted before the move
                    _ => &found.vxlan,
                };
                if let Some(f) = f {
                    nl.delete_link("delete wrong device", f.index)?;
                }
            }
            Step::CreateVrf => nl.create_link("create vrf", vrf_request(&w.vpc, w.table))?,
            Step::VrfUp => {
                let i = index_of(&mut nl, &w.vpc)?;
                nl.set_link("vrf up", up_request(i))?;
            }
            Step::CreateBridge => {
                let mut l = named(&w.bridge(), InfoKind::Bridge, None);
                l.attributes
                    .push(LinkAttribute::Address(w.router_mac.to_vec()));
                nl.create_link("create bridge", l)?;
            }
            Step::BridgeMac => {
                let i = index_of(&mut nl, &w.bridge())?;
                let mut l = LinkMessage::default();
                l.header.index = i;
                l.attributes
                    .push(LinkAttribute::Address(w.router_mac.to_vec()));
                nl.set_link("bridge mac", l)?;
            }
            Step::BridgeIntoVrf => {
                let b = index_of(&mut nl, &w.bridge())?;
                let v = index_of(&mut nl, &w.vpc)?;
                let mut l = LinkMessage::default();
                l.header.index = b;
                l.attributes.push(LinkAttribute::Controller(v));
                nl.set_link("bridge into vrf", l)?;
            }
            Step::BridgeUp => {
                let i = index_of(&mut nl, &w.bridge())?;
                nl.set_link("bridge up", up_request(i))?;
            }
            Step::CreateVxlan => {
                if vxlan_moved_in {
                    // Moved in under its temporary name: give it its own.
                    let i = index_of(&mut nl, &format!("dpucp{}", w.vni))?;
                    let mut l = LinkMessage::default();
                    l.header.index = i;
                    l.attributes.push(LinkAttribute::IfName(w.vxlan()));
                    nl.set_link("name vxlan", l)?;
                } else {
                    nl.create_link("create vxlan", vxlan_request(&w.vxlan(), w))?;
                }
            }
            Step::VxlanIntoBridge => {
                let x = index_of(&mut nl, &w.vxlan())?;
                let b = index_of(&mut nl, &w.bridge())?;
                let mut l = LinkMessage::default();
                l.header.index = x;
                l.attributes.push(LinkAttribute::Controller(b));
                nl.set_link("vxlan into bridge", l)?;
            }
            Step::VxlanUp => {
                let i = index_of(&mut nl, &w.vxlan())?;
                nl.set_link("vxlan up", up_request(i))?;
            }
            Step::CreateNamespace => {}
        }
    }
    Ok(())
}

fn vxlan_request(name: &str, w: &VpcInterfaces) -> LinkMessage {
    named(
        name,
        InfoKind::Vxlan,
        Some(InfoData::Vxlan(vec![
            InfoVxlan::Id(w.vni),
            InfoVxlan::Local(w.vtep),
            InfoVxlan::Port(VXLAN_PORT),
            InfoVxlan::Learning(false),
        ])),
    )
}

fn reconcile_vrf_devices(want: &BTreeMap<String, VpcInterfaces>) -> Result<Report, IfmgrError> {
    let mut report = Report::default();
    let mut nl = Rtnl::open()?;
    let links = nl.links()?;
    // VRF devices of VPCs no longer desired: ours if they hold a brN with a vxN under it.
    for l in &links {
        let f = found(l);
        let Some(name) = link_name(l) else { continue };
        if !matches!(f.kind, FoundKind::Vrf { .. }) || want.contains_key(name) {
            continue;
        }
        let slaves: Vec<LinkMessage> = links
            .iter()
            .filter(|s| found(s).master == Some(f.index))
            .cloned()
            .collect();
        let bridges: Vec<u32> = slaves.iter().map(|s| s.header.index).collect();
        let under: Vec<LinkMessage> = links
            .iter()
            .filter(|s| found(s).master.is_some_and(|m| bridges.contains(&m)))
            .cloned()
            .collect();
        let mut all = slaves.clone();
        all.extend(under.iter().cloned());
        if is_ours(&all) {
            for d in under.iter().chain(slaves.iter()) {
                nl.delete_link("delete a gone VPC's device", d.header.index)?;
            }
            nl.delete_link("delete a gone VPC's vrf", f.index)?;
            tracing::info!(vpc = %name, "VPC gone: its VRF device removed");
            report.removed.push(name.to_owned());
        }
    }
    let links = nl.links()?;
    for (name, w) in want {
        let found = observe(&links, w);
        let steps = diff(w, &found, &Backend::VrfDevice, true);
        if steps.is_empty() {
            continue;
        }
        tracing::info!(vpc = %name, ?steps, "fixing the VPC's interfaces");
        apply_inside(w, &found, &steps, false)?;
        report.changed.insert(name.clone(), steps);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn want() -> VpcInterfaces {
        VpcInterfaces {
            vpc: "blue".into(),
            vni: 1000,
            table: 10,
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            router_mac: [2, 0, 0, 0, 0, 1],
        }
    }

    fn dev(index: u32, master: Option<u32>, kind: FoundKind, mac: &[u8]) -> Found {
        Found {
            index,
            up: true,
            mac: mac.to_vec(),
            master,
            kind,
        }
    }

    fn right_netns() -> FoundVpc {
        FoundVpc {
            vrf: None,
            bridge: Some(dev(2, None, FoundKind::Bridge, &[2, 0, 0, 0, 0, 1])),
            vxlan: Some(dev(
                3,
                Some(2),
                FoundKind::Vxlan {
                    vni: Some(1000),
                    local: Some(Ipv4Addr::new(192, 0, 2, 1)),
                    port: Some(4789),
                },
                &[9; 6],
            )),
        }
    }

    fn netns() -> Backend {
        Backend::Netns {
            dir: "/run/netns".into(),
        }
    }

    #[test]
    fn unit_right_devices_need_nothing() {
        assert!(diff(&want(), &right_netns(), &netns(), true).is_empty());
    }

    #[test]
    fn unit_nothing_there_creates_everything_in_order() {
        assert_eq!(
            diff(&want(), &FoundVpc::default(), &netns(), false),
            vec![
                Step::CreateNamespace,
                Step::CreateBridge,
                Step::BridgeUp,
                Step::CreateVxlan,
                Step::VxlanIntoBridge,
                Step::VxlanUp
            ]
        );
    }

    #[test]
    fn unit_only_the_wrong_part_is_fixed() {
        let mut f = right_netns();
        if let Some(x) = f.vxlan.as_mut() {
            x.up = false;
        }
        assert_eq!(diff(&want(), &f, &netns(), true), vec![Step::VxlanUp]);
        let mut f = right_netns();
        if let Some(b) = f.bridge.as_mut() {
            b.mac = vec![2, 0, 0, 0, 0, 9];
        }
        assert_eq!(diff(&want(), &f, &netns(), true), vec![Step::BridgeMac]);
        // A wrong VNI cannot be changed in place: that device alone is replaced.
        let mut f = right_netns();
        if let Some(x) = f.vxlan.as_mut() {
            x.kind = FoundKind::Vxlan {
                vni: Some(7),
                local: Some(Ipv4Addr::new(192, 0, 2, 1)),
                port: Some(4789),
            };
        }
        assert_eq!(
            diff(&want(), &f, &netns(), true),
            vec![
                Step::Delete("vxlan"),
                Step::CreateVxlan,
                Step::VxlanIntoBridge,
                Step::VxlanUp
            ]
        );
    }

    /// The VRF-device backend is planned and diffed here; it cannot run on this kernel (no
    /// VRF devices), so only its plan is tested.
    #[test]
    fn unit_vrf_device_backend_plan() {
        assert_eq!(
            diff(&want(), &FoundVpc::default(), &Backend::VrfDevice, true),
            vec![
                Step::CreateVrf,
                Step::VrfUp,
                Step::CreateBridge,
                Step::BridgeIntoVrf,
                Step::BridgeUp,
                Step::CreateVxlan,
                Step::VxlanIntoBridge,
                Step::VxlanUp
            ]
        );
        let mut f = right_netns();
        f.vrf = Some(dev(1, None, FoundKind::Vrf { table: Some(10) }, &[]));
        if let Some(b) = f.bridge.as_mut() {
            b.master = Some(1);
        }
        assert!(diff(&want(), &f, &Backend::VrfDevice, true).is_empty());
        // Wrong table: the VRF device is replaced and the bridge re-enslaved.
        f.vrf = Some(dev(1, None, FoundKind::Vrf { table: Some(11) }, &[]));
        assert_eq!(
            diff(&want(), &f, &Backend::VrfDevice, true),
            vec![
                Step::Delete("vrf"),
                Step::CreateVrf,
                Step::VrfUp,
                Step::BridgeIntoVrf
            ]
        );
    }

    #[test]
    fn unit_config_is_checked() {
        let bad = InterfacesSection {
            backend: Some("bogus".into()),
            netns_dir: None,
        };
        assert!(matches!(
            Backend::from_config(&bad),
            Err(IfmgrError::Config {
                field: "backend",
                ..
            })
        ));
        let rel = InterfacesSection {
            backend: Some("netns".into()),
            netns_dir: Some("run/netns".into()),
        };
        assert!(matches!(
            Backend::from_config(&rel),
            Err(IfmgrError::Config {
                field: "netns_dir",
                ..
            })
        ));
    }
}
