//! zebra's view as we received it (routes by table and prefix, nexthop objects, EVPN router
//! MACs), turned into the model's routes.
//!
//! Each zebra route is evaluated into one of three outcomes:
//! - **installed**: a model [`Route`] was emitted as [`Change::UpsertRoute`];
//! - **pending**: it names a nexthop id not defined yet (FRR 8.4 does this with nexthop groups
//!   on) or a VTEP whose router MAC has not arrived; it is re-evaluated when that arrives;
//! - **unattributed**: it is not the DPU's (no table mapping, an interface that is no DPU port,
//!   a directly connected route, an unknown gateway MAC). It is kept for feedback, not emitted.
//!
//! A route that was installed and later becomes pending keeps its last model route: a
//! transient gap in zebra's nexthop objects must not withdraw traffic that is flowing.
//!
//! Routes on no DPU (unattributed, or pending with nothing installed) are [`NotTaken`]; with
//! [`Rib::track_not_taken`] on, every change of that set is journaled for
//! [`Rib::take_not_taken`] (the host agent shows them in `dpuctl status`, counts and logs
//! them). Each route also remembers the offload flags last acknowledged to zebra on this
//! connection ([`Rib::feedback_due`], [`Rib::note_feedback`]): zebra is told a status once,
//! and again only when it changes, zebra sent the route again, or zebra reconnected
//! ([`Rib::forget_feedback`]).

use std::collections::hash_map::Entry as HEntry;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr};

use flow_offload::model::{
    Change, MacAddr, Nexthop, PortId, Prefix, Route, RouteKey, TableId, Vni, MAX_ECMP,
};

use super::decode::{
    FpmEvent, NeighbourUpdate, NexthopKind, PathSpec, RouteKind, RouteNexthops, RouteUpdate,
    AF_BRIDGE,
};

/// A small multiplicative hasher: the keys come from zebra (trusted), and SipHash would cost
/// a third of the ingest time.
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        // The multiply only carries low bits upward: fold the high bits back down, since
        // hashbrown takes the bucket from the low bits (murmur3's finaliser).
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.write_u64(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

/// A `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

/// Hash a table and prefix as two or three words (the derived `Hash` of `IpAddr` goes through
/// byte slices and costs several times more).
fn hash_route<H: Hasher>(table: u32, prefix: &Prefix, h: &mut H) {
    match prefix.addr() {
        IpAddr::V4(a) => h.write_u64(u64::from(u32::from(a)) << 8 | u64::from(prefix.len())),
        IpAddr::V6(a) => {
            let v = u128::from(a);
            h.write_u64((v >> 64) as u64);
            h.write_u64(v as u64 ^ (1 << 63) ^ u64::from(prefix.len()));
        }
    }
    h.write_u32(table);
}

/// zebra's key of a route: its table and prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ZKey(u32, Prefix);

impl std::hash::Hash for ZKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        hash_route(self.0, &self.1, h);
    }
}

/// A model route key with the cheap hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MKey(RouteKey);

impl std::hash::Hash for MKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        hash_route(self.0.table.0, &self.0.prefix, h);
    }
}

/// What the host agent knows that zebra does not say: which model table and DPU port a zebra
/// route belongs to.
pub trait Attribution {
    /// The model table of a route in zebra table `zebra_table`. `hint` is the first path's VNI
    /// or interface: with netns VRFs every VRF arrives as table 254, so the table alone cannot
    /// tell a VPC's routes from the underlay's.
    fn table(&self, zebra_table: u32, hint: PathHint) -> Option<TableId>;
    /// The DPU port behind a host interface, if it is one.
    fn port(&self, ifindex: u32) -> Option<PortId>;
    /// The resolved link-layer address of an underlay gateway.
    fn gateway_mac(&self, gateway: IpAddr, ifindex: u32) -> Option<MacAddr>;
}

/// What a route's first path says about where it belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathHint {
    /// Nothing (blackholes).
    None,
    /// The outgoing interface.
    Ifindex(u32),
    /// The VXLAN VNI (EVPN).
    Vni(u32),
}

/// A fixed-map [`Attribution`]: by VNI first, then by interface, then by zebra table.
#[derive(Debug, Clone, Default)]
pub struct StaticAttribution {
    /// zebra table → model table.
    pub tables: FastMap<u32, TableId>,
    /// VNI → model table.
    pub vnis: FastMap<u32, TableId>,
    /// Interface → model table (netns VRFs).
    pub ifindex_tables: FastMap<u32, TableId>,
    /// Interface → DPU port.
    pub ports: FastMap<u32, PortId>,
    /// Gateway → MAC.
    pub macs: FastMap<IpAddr, MacAddr>,
    /// MAC for gateways not in `macs` (tests that do not care).
    pub default_mac: Option<MacAddr>,
}

impl Attribution for StaticAttribution {
    fn table(&self, zebra_table: u32, hint: PathHint) -> Option<TableId> {
        let by_hint = match hint {
            PathHint::Vni(v) => self.vnis.get(&v),
            PathHint::Ifindex(i) => self.ifindex_tables.get(&i),
            PathHint::None => None,
        };
        by_hint.or_else(|| self.tables.get(&zebra_table)).copied()
    }
    fn port(&self, ifindex: u32) -> Option<PortId> {
        self.ports.get(&ifindex).copied()
    }
    fn gateway_mac(&self, gateway: IpAddr, _ifindex: u32) -> Option<MacAddr> {
        self.macs.get(&gateway).copied().or(self.default_mac)
    }
}

/// zebra's identity of a route: what feedback must echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ZebraRoute {
    /// zebra's table id.
    pub table: u32,
    /// The prefix.
    pub prefix: Prefix,
    /// `rtm_protocol` as zebra sent it.
    pub protocol: u8,
}

/// Why a route is not the DPU's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unattributed {
    /// No model table for its zebra table / VNI / interface.
    NoTable,
    /// Its interface is not a DPU port.
    NoPort(u32),
    /// No MAC known for its gateway.
    NoGatewayMac(IpAddr),
    /// Directly connected (no gateway): the DPU model has no attached-subnet nexthop.
    Connected,
    /// No nexthop at all.
    NoNexthop,
    /// A VNI out of range or a VXLAN path without an IPv4 VTEP.
    BadVxlan,
    /// Not a forwarding route (local, broadcast, ...).
    NotForwarding(u8),
}

impl std::fmt::Display for Unattributed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unattributed::NoTable => write!(
                f,
                "not ours: its table or VNI is neither a VPC's nor the underlay's"
            ),
            Unattributed::NoPort(i) => write!(
                f,
                "not ours: it leaves through interface {i}, which is no DPU port (fpm.interfaces)"
            ),
            Unattributed::NoGatewayMac(gw) => {
                write!(f, "no MAC known for gateway {gw} (fpm.neighbours)")
            }
            Unattributed::Connected => write!(
                f,
                "connected route: not ours (a directly attached subnet, delivered by the host)"
            ),
            Unattributed::NoNexthop => write!(f, "no next hop"),
            Unattributed::BadVxlan => {
                write!(f, "a VXLAN next hop without a valid VNI or an IPv4 VTEP")
            }
            Unattributed::NotForwarding(t) => {
                write!(f, "not ours: not a forwarding route (rtm_type {t})")
            }
        }
    }
}

/// Why a zebra route is on no DPU, as far as the RIB knows (the model may still refuse a route
/// the RIB emits; the host agent adds those).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotTaken {
    /// Not the DPU's.
    Unattributed(Unattributed),
    /// Waiting, with nothing installed meanwhile.
    Pending(Wait),
}

impl NotTaken {
    /// A machine-readable reason code (`dpuctl status`, the `reason` label of
    /// `dpucp_frr_routes_refused`).
    pub fn code(&self) -> &'static str {
        match self {
            NotTaken::Unattributed(u) => match u {
                Unattributed::NoTable => "no_table",
                Unattributed::NoPort(_) => "no_port",
                Unattributed::NoGatewayMac(_) => "no_gateway_mac",
                Unattributed::Connected => "connected",
                Unattributed::NoNexthop => "no_nexthop",
                Unattributed::BadVxlan => "bad_vxlan",
                Unattributed::NotForwarding(_) => "not_forwarding",
            },
            NotTaken::Pending(Wait::NexthopId(_)) => "pending_nexthop",
            NotTaken::Pending(Wait::RouterMac(_)) => "pending_router_mac",
        }
    }

    /// Every code [`NotTaken::code`] gives.
    pub const CODES: [&'static str; 9] = [
        "no_table",
        "no_port",
        "no_gateway_mac",
        "connected",
        "no_nexthop",
        "bad_vxlan",
        "not_forwarding",
        "pending_nexthop",
        "pending_router_mac",
    ];

    /// The route's state, if it leaves the route on no DPU.
    pub fn of(state: &RouteState) -> Option<NotTaken> {
        match *state {
            RouteState::Unattributed(u) => Some(NotTaken::Unattributed(u)),
            RouteState::Pending {
                waiting,
                installed: None,
            } => Some(NotTaken::Pending(waiting)),
            _ => None,
        }
    }
}

impl std::fmt::Display for NotTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotTaken::Unattributed(u) => u.fmt(f),
            NotTaken::Pending(Wait::NexthopId(id)) => {
                write!(f, "waits for nexthop id {id}, which zebra has not sent")
            }
            NotTaken::Pending(Wait::RouterMac(v)) => {
                write!(
                    f,
                    "waits for the router MAC of VTEP {v} (an EVPN neighbour)"
                )
            }
        }
    }
}

/// Where one zebra route stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteState {
    /// Emitted as this model route.
    Installed(RouteKey),
    /// Waiting for a nexthop id or router MAC (maybe still installed from before).
    Pending {
        /// What it waits for.
        waiting: Wait,
        /// The model route still in force, if any.
        installed: Option<RouteKey>,
    },
    /// Not the DPU's.
    Unattributed(Unattributed),
}

/// What a pending route waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wait {
    /// A nexthop object id.
    NexthopId(u32),
    /// The router MAC of a remote VTEP.
    RouterMac(Ipv4Addr),
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RibStats {
    /// zebra routes known.
    pub routes: u64,
    /// Nexthop objects known.
    pub nexthops: u64,
    /// Routes currently pending.
    pub pending: u64,
    /// Times a route referenced a nexthop id never defined (FRR 8.4 does this).
    pub unknown_nexthop_refs: u64,
    /// Routes currently unattributed.
    pub unattributed: u64,
    /// Two zebra routes mapped to the same model route (the later one wins).
    pub conflicts: u64,
    /// Routes with more than `MAX_ECMP` paths (the first ones are kept).
    pub truncated_ecmp: u64,
    /// Deletes for routes we never had.
    pub unknown_deletes: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    // What evaluation needs of zebra's message (table and prefix are the key): kept small,
    // a full table is millions of these.
    protocol: u8,
    kind: RouteKind,
    nexthops: RouteNexthops,
    state: RouteState,
    vteps: Vec<Ipv4Addr>,
    generation: u64,
    /// The offload flags last acknowledged to zebra on this connection (0: none).
    feedback: u32,
}

/// Changes for the model, coalesced per route: the last change to a key wins, so zebra's
/// delete-then-add of one update never reaches the DPU as a flap.
#[derive(Debug, Default)]
pub struct ChangeBatch {
    changes: Vec<Change>,
    index: FastMap<MKey, usize>,
}

impl ChangeBatch {
    /// An empty batch.
    pub fn new() -> ChangeBatch {
        ChangeBatch::default()
    }

    fn put(&mut self, key: RouteKey, c: Change) {
        match self.index.get(&MKey(key)) {
            Some(&i) => {
                if let Some(slot) = self.changes.get_mut(i) {
                    *slot = c;
                }
            }
            None => {
                self.index.insert(MKey(key), self.changes.len());
                self.changes.push(c);
            }
        }
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// Whether there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The changes, in first-touched order.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Take the changes, leaving the batch empty.
    pub fn take(&mut self) -> Vec<Change> {
        self.index.clear();
        std::mem::take(&mut self.changes)
    }
}

/// The routes, nexthop objects and router MACs zebra sent.
#[derive(Debug, Default)]
pub struct Rib {
    routes: FastMap<ZKey, Entry>,
    nexthops: FastMap<u32, NexthopKind>,
    nh_users: Users<u32>,
    groups_of: FastMap<u32, FastSet<u32>>,
    vtep_users: Users<Ipv4Addr>,
    rmacs: FastMap<Ipv4Addr, MacAddr>,
    by_model: FastMap<MKey, ZKey>,
    generation: u64,
    stats: RibStats,
    /// Changes of the routes on no DPU, when tracked.
    not_taken: Option<Vec<(ZebraRoute, Option<NotTaken>)>>,
}

enum Outcome {
    Route(Route, Vec<Ipv4Addr>),
    Pending(Wait, Vec<Ipv4Addr>),
    Unattributed(Unattributed),
}

impl Rib {
    /// An empty RIB.
    pub fn new() -> Rib {
        Rib::default()
    }

    /// Counters (gauges computed now).
    pub fn stats(&self) -> RibStats {
        let mut s = self.stats;
        s.routes = self.routes.len() as u64;
        s.nexthops = self.nexthops.len() as u64;
        s.pending = 0;
        s.unattributed = 0;
        for e in self.routes.values() {
            match e.state {
                RouteState::Pending { .. } => s.pending += 1,
                RouteState::Unattributed(_) => s.unattributed += 1,
                RouteState::Installed(_) => {}
            }
        }
        s
    }

    /// Journal every change of the routes on no DPU ([`NotTaken`]) from now on, for
    /// [`Rib::take_not_taken`] (which the owner must call after each change, or the journal
    /// grows with every change).
    pub fn track_not_taken(&mut self) {
        self.not_taken.get_or_insert_with(Vec::new);
    }

    /// The changes since the last call: a zebra route now on no DPU and why (`Some`), or no
    /// longer so (`None`: taken, or deleted). In order; a route may appear more than once.
    pub fn take_not_taken(&mut self) -> Vec<(ZebraRoute, Option<NotTaken>)> {
        self.not_taken
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Every zebra route on no DPU now, and why.
    pub fn not_taken(&self) -> impl Iterator<Item = (ZebraRoute, NotTaken)> + '_ {
        self.routes.iter().filter_map(|(z, e)| {
            NotTaken::of(&e.state).map(|n| {
                (
                    ZebraRoute {
                        table: z.0,
                        prefix: z.1,
                        protocol: e.protocol,
                    },
                    n,
                )
            })
        })
    }

    /// Whether zebra must be told `flags` for model route `key`: true unless exactly these
    /// flags were acknowledged for it since zebra last sent the route or reconnected. (False
    /// for a route zebra does not have.)
    pub fn feedback_due(&self, key: &RouteKey, flags: u32) -> bool {
        self.by_model
            .get(&MKey(*key))
            .and_then(|z| self.routes.get(z))
            .is_some_and(|e| e.feedback != flags)
    }

    /// Records that `flags` were acknowledged to zebra for model route `key`.
    pub fn note_feedback(&mut self, key: &RouteKey, flags: u32) {
        if let Some(e) = self
            .by_model
            .get(&MKey(*key))
            .and_then(|z| self.routes.get_mut(z))
        {
            e.feedback = flags;
        }
    }

    /// zebra reconnected: it keeps old flags but we cannot know which, so nothing counts as
    /// acknowledged any more. O(routes), once per connection.
    pub fn forget_feedback(&mut self) {
        for e in self.routes.values_mut() {
            e.feedback = 0;
        }
    }

    /// zebra's identity of the zebra route behind a model route, for feedback.
    pub fn zebra_route(&self, key: &RouteKey) -> Option<ZebraRoute> {
        let z = self.by_model.get(&MKey(*key))?;
        let e = self.routes.get(z)?;
        Some(ZebraRoute {
            table: z.0,
            prefix: z.1,
            protocol: e.protocol,
        })
    }

    /// Every zebra route with its state (for re-acknowledging after a reconnect).
    pub fn routes(&self) -> impl Iterator<Item = (ZebraRoute, RouteState)> + '_ {
        self.routes.iter().map(|(z, e)| {
            (
                ZebraRoute {
                    table: z.0,
                    prefix: z.1,
                    protocol: e.protocol,
                },
                e.state,
            )
        })
    }

    /// The state of one zebra route.
    pub fn state(&self, table: u32, prefix: Prefix) -> Option<RouteState> {
        self.routes.get(&ZKey(table, prefix)).map(|e| e.state)
    }

    /// The router MAC known for a remote VTEP.
    pub fn router_mac(&self, vtep: Ipv4Addr) -> Option<MacAddr> {
        self.rmacs.get(&vtep).copied()
    }

    /// zebra reconnected and replays everything: routes not replayed before
    /// [`Rib::end_resync`] are removed then. Routes not replayed stay installed until then,
    /// marked stale (an older generation); if this connection never ends its replay, the next
    /// one's `end_resync` removes them too. When to call `end_resync` at all is
    /// [`ReplayTracker`](super::replay::ReplayTracker)'s rule.
    pub fn begin_resync(&mut self) {
        self.generation += 1;
    }

    /// Remove the routes zebra did not replay since [`Rib::begin_resync`] (and any left stale
    /// by earlier connections that never completed a replay).
    pub fn end_resync(&mut self, attr: &dyn Attribution, out: &mut ChangeBatch) {
        let stale: Vec<ZKey> = self
            .routes
            .iter()
            .filter(|(_, e)| e.generation < self.generation)
            .map(|(k, _)| *k)
            .collect();
        for z in stale {
            self.delete_route(z, attr, out);
        }
    }

    /// Evaluate every route again: after the [`Attribution`] changed (ports, tables, MACs).
    pub fn reevaluate_all(&mut self, attr: &dyn Attribution, out: &mut ChangeBatch) {
        let keys: Vec<ZKey> = self.routes.keys().copied().collect();
        self.reevaluate(keys, attr, out);
    }

    /// Apply a batch of events.
    pub fn apply_all<'a>(
        &mut self,
        events: impl IntoIterator<Item = &'a FpmEvent>,
        attr: &dyn Attribution,
        out: &mut ChangeBatch,
    ) {
        for ev in events {
            self.apply(ev, attr, out);
        }
    }

    /// Apply one event; model changes go to `out`.
    pub fn apply(&mut self, ev: &FpmEvent, attr: &dyn Attribution, out: &mut ChangeBatch) {
        match ev {
            FpmEvent::Route(r) => self.upsert_route(r.clone(), attr, out),
            FpmEvent::RouteDeleted(d) => {
                let z = ZKey(d.table, d.prefix);
                if self.routes.contains_key(&z) {
                    self.delete_route(z, attr, out);
                } else {
                    self.stats.unknown_deletes += 1;
                }
            }
            FpmEvent::Nexthop(n) => {
                // zebra replays every nexthop on reconnect: an unchanged one changes no route.
                if self.nexthops.get(&n.id) == Some(&n.kind) {
                    return;
                }
                if let Some(NexthopKind::Group(old)) = self.nexthops.get(&n.id) {
                    for (m, _) in old.clone() {
                        if let Some(s) = self.groups_of.get_mut(&m) {
                            s.remove(&n.id);
                        }
                    }
                }
                if let NexthopKind::Group(g) = &n.kind {
                    for (m, _) in g {
                        self.groups_of.entry(*m).or_default().insert(n.id);
                    }
                }
                self.nexthops.insert(n.id, n.kind.clone());
                self.reevaluate_nexthop(n.id, attr, out);
            }
            FpmEvent::NexthopDeleted(id) => {
                if let Some(NexthopKind::Group(old)) = self.nexthops.remove(id) {
                    for (m, _) in old {
                        if let Some(s) = self.groups_of.get_mut(&m) {
                            s.remove(id);
                        }
                    }
                }
                self.reevaluate_nexthop(*id, attr, out);
            }
            FpmEvent::Neighbour(n) => {
                if let Some((vtep, mac)) = router_mac(n) {
                    if self.rmacs.insert(vtep, mac) != Some(mac) {
                        self.reevaluate_vtep(vtep, attr, out);
                    }
                }
            }
            FpmEvent::NeighbourDeleted(n) => {
                // Keep forwarding with the last MAC: EVPN withdraws the routes themselves.
                if let Some((vtep, _)) = router_mac(n) {
                    self.rmacs.remove(&vtep);
                }
            }
        }
    }

    fn reevaluate_nexthop(&mut self, id: u32, attr: &dyn Attribution, out: &mut ChangeBatch) {
        let mut affected: Vec<ZKey> = Vec::new();
        if let Some(u) = self.nh_users.get(&id) {
            affected.extend(u.iter().copied());
        }
        if let Some(groups) = self.groups_of.get(&id) {
            for g in groups {
                if let Some(u) = self.nh_users.get(g) {
                    affected.extend(u.iter().copied());
                }
            }
        }
        self.reevaluate(affected, attr, out);
    }

    fn reevaluate_vtep(&mut self, vtep: Ipv4Addr, attr: &dyn Attribution, out: &mut ChangeBatch) {
        let affected: Vec<ZKey> = self
            .vtep_users
            .get(&vtep)
            .map(|u| u.iter().copied().collect())
            .unwrap_or_default();
        self.reevaluate(affected, attr, out);
    }

    fn reevaluate(&mut self, keys: Vec<ZKey>, attr: &dyn Attribution, out: &mut ChangeBatch) {
        for z in keys {
            if let Some(e) = self.routes.get(&z) {
                let update = RouteUpdate {
                    table: z.0,
                    prefix: z.1,
                    protocol: e.protocol,
                    kind: e.kind,
                    replace: false,
                    metric: None,
                    nexthops: e.nexthops.clone(),
                };
                let generation = e.generation;
                self.install(z, update, generation, attr, out);
            }
        }
    }

    fn upsert_route(&mut self, r: RouteUpdate, attr: &dyn Attribution, out: &mut ChangeBatch) {
        let z = ZKey(r.table, r.prefix);
        let generation = self.generation;
        // zebra's reconnect replay resends every route unchanged: nothing to evaluate or send
        // (nexthop and router-MAC changes re-evaluate their routes themselves).
        if let Some(e) = self.routes.get_mut(&z) {
            // zebra sent it again: its new route entry has no offload flags yet.
            e.feedback = 0;
            if matches!(e.state, RouteState::Installed(_))
                && e.protocol == r.protocol
                && e.kind == r.kind
                && e.nexthops == r.nexthops
            {
                e.generation = generation;
                return;
            }
        }
        self.install(z, r, generation, attr, out);
    }

    fn install(
        &mut self,
        z: ZKey,
        update: RouteUpdate,
        generation: u64,
        attr: &dyn Attribution,
        out: &mut ChangeBatch,
    ) {
        let outcome = self.evaluate(&update, attr);
        // One lookup in the route map, updated in place: this is the replay hot path.
        let Rib {
            routes,
            by_model,
            nh_users,
            vtep_users,
            stats,
            not_taken,
            ..
        } = self;
        let mut slot = routes.entry(z);
        let (old_installed, old_nh, old_vteps, old_off) = match &mut slot {
            HEntry::Occupied(o) => {
                let e = o.get_mut();
                (
                    installed_key(&e.state),
                    nexthop_id(&e.nexthops),
                    std::mem::take(&mut e.vteps),
                    NotTaken::of(&e.state).map(|n| (n, e.protocol)),
                )
            }
            HEntry::Vacant(_) => (None, None, Vec::new(), None),
        };
        let (state, vteps) = match outcome {
            Outcome::Route(mut route, vteps) => {
                if route.nexthops.len() > MAX_ECMP {
                    stats.truncated_ecmp += 1;
                    route.nexthops.truncate(MAX_ECMP);
                }
                let key = route.key;
                if let Some(k) = old_installed.filter(|k| *k != key) {
                    withdraw(by_model, z, k, out);
                }
                if let Some(other) = by_model.insert(MKey(key), z) {
                    if other != z {
                        stats.conflicts += 1;
                        tracing::warn!(model = ?key, zebra_table = z.0, other_table = other.0,
                            "FPM: two zebra routes map to one model route; the later wins");
                    }
                }
                out.put(key, Change::UpsertRoute(route));
                (RouteState::Installed(key), vteps)
            }
            Outcome::Pending(waiting, vteps) => {
                if let Wait::NexthopId(id) = waiting {
                    stats.unknown_nexthop_refs += 1;
                    // Logged by the owner, rate-limited, from the not-taken journal.
                    tracing::debug!(nexthop_id = id, prefix = %z.1, table = z.0,
                        "FPM: route names an undefined nexthop id; pending until it arrives");
                }
                (
                    RouteState::Pending {
                        waiting,
                        installed: old_installed,
                    },
                    vteps,
                )
            }
            Outcome::Unattributed(why) => {
                tracing::debug!(prefix = %z.1, table = z.0, ?why, "FPM: route is not the DPU's");
                if let Some(k) = old_installed {
                    withdraw(by_model, z, k, out);
                }
                (RouteState::Unattributed(why), Vec::new())
            }
        };
        let new_nh = nexthop_id(&update.nexthops);
        if old_nh != new_nh {
            unindex(nh_users, old_nh.as_slice(), z);
            index(nh_users, new_nh.as_slice(), z);
        }
        if old_vteps != vteps {
            unindex(vtep_users, &old_vteps, z);
            index(vtep_users, &vteps, z);
        }
        if let Some(journal) = not_taken.as_mut() {
            let new_off = NotTaken::of(&state).map(|n| (n, update.protocol));
            if new_off != old_off {
                let zr = ZebraRoute {
                    table: z.0,
                    prefix: z.1,
                    protocol: update.protocol,
                };
                journal.push((zr, new_off.map(|(n, _)| n)));
            }
        }
        match slot {
            HEntry::Occupied(mut o) => {
                let e = o.get_mut();
                e.protocol = update.protocol;
                e.kind = update.kind;
                e.nexthops = update.nexthops;
                e.state = state;
                e.vteps = vteps;
                e.generation = generation;
            }
            HEntry::Vacant(v) => {
                v.insert(Entry {
                    protocol: update.protocol,
                    kind: update.kind,
                    nexthops: update.nexthops,
                    state,
                    vteps,
                    generation,
                    feedback: 0,
                });
            }
        }
    }

    fn delete_route(&mut self, z: ZKey, _attr: &dyn Attribution, out: &mut ChangeBatch) {
        if let Some(e) = self.routes.remove(&z) {
            unindex(&mut self.nh_users, nexthop_id(&e.nexthops).as_slice(), z);
            unindex(&mut self.vtep_users, &e.vteps, z);
            if let (Some(journal), true) =
                (self.not_taken.as_mut(), NotTaken::of(&e.state).is_some())
            {
                let zr = ZebraRoute {
                    table: z.0,
                    prefix: z.1,
                    protocol: e.protocol,
                };
                journal.push((zr, None));
            }
            if let Some(k) = installed_key(&e.state) {
                withdraw(&mut self.by_model, z, k, out);
            }
        }
    }

    fn evaluate(&self, r: &RouteUpdate, attr: &dyn Attribution) -> Outcome {
        match r.kind {
            RouteKind::Unicast => {}
            k if k.drops() => return self.blackhole(r, attr),
            RouteKind::Other(t) => return Outcome::Unattributed(Unattributed::NotForwarding(t)),
            _ => return Outcome::Unattributed(Unattributed::NotForwarding(0)),
        }
        // Borrowed for inline paths and single nexthop objects (the common case): no allocation.
        let paths: std::borrow::Cow<'_, [PathSpec]> = match &r.nexthops {
            RouteNexthops::Paths(p) => std::borrow::Cow::Borrowed(p.as_slice()),
            RouteNexthops::Id(id) => match self.nexthops.get(id) {
                None => return Outcome::Pending(Wait::NexthopId(*id), Vec::new()),
                Some(NexthopKind::Blackhole) => return self.blackhole(r, attr),
                Some(NexthopKind::Single(s)) => std::borrow::Cow::Borrowed(std::slice::from_ref(s)),
                Some(NexthopKind::Group(g)) => {
                    let mut v = Vec::with_capacity(g.len());
                    for (m, weight) in g {
                        match self.nexthops.get(m) {
                            Some(NexthopKind::Single(s)) => v.push(PathSpec {
                                weight: *weight,
                                ..*s
                            }),
                            // A blackhole member drops its share: not expressible, skip it.
                            Some(NexthopKind::Blackhole) => {}
                            Some(NexthopKind::Group(_)) => {}
                            None => return Outcome::Pending(Wait::NexthopId(*m), Vec::new()),
                        }
                    }
                    std::borrow::Cow::Owned(v)
                }
            },
        };
        let Some(first) = paths.first() else {
            return Outcome::Unattributed(Unattributed::NoNexthop);
        };
        let hint = match (first.vni, first.ifindex) {
            (Some(v), _) => PathHint::Vni(v),
            (None, 0) => PathHint::None,
            (None, i) => PathHint::Ifindex(i),
        };
        let Some(table) = attr.table(r.table, hint) else {
            return Outcome::Unattributed(Unattributed::NoTable);
        };
        let mut nexthops = Vec::with_capacity(paths.len());
        let mut vteps = Vec::new();
        let mut missing_rmac = None;
        for p in paths.iter() {
            if let Some(v) = p.vni {
                let (Ok(vni), Some(IpAddr::V4(vtep))) = (Vni::new(v), p.gateway) else {
                    return Outcome::Unattributed(Unattributed::BadVxlan);
                };
                vteps.push(vtep);
                match self.rmacs.get(&vtep) {
                    Some(mac) => nexthops.push(Nexthop::Vxlan {
                        vni,
                        remote_vtep: vtep,
                        router_mac: *mac,
                    }),
                    None => missing_rmac = Some(vtep),
                }
                continue;
            }
            let Some(gateway) = p.gateway else {
                return Outcome::Unattributed(Unattributed::Connected);
            };
            let Some(port) = attr.port(p.ifindex) else {
                return Outcome::Unattributed(Unattributed::NoPort(p.ifindex));
            };
            let Some(mac) = attr.gateway_mac(gateway, p.ifindex) else {
                return Outcome::Unattributed(Unattributed::NoGatewayMac(gateway));
            };
            nexthops.push(Nexthop::Underlay { gateway, port, mac });
        }
        if let Some(vtep) = missing_rmac {
            return Outcome::Pending(Wait::RouterMac(vtep), vteps);
        }
        nexthops.sort_unstable();
        nexthops.dedup();
        Outcome::Route(
            Route {
                key: RouteKey {
                    table,
                    prefix: r.prefix,
                },
                nexthops,
            },
            vteps,
        )
    }

    fn blackhole(&self, r: &RouteUpdate, attr: &dyn Attribution) -> Outcome {
        match attr.table(r.table, PathHint::None) {
            Some(table) => Outcome::Route(
                Route {
                    key: RouteKey {
                        table,
                        prefix: r.prefix,
                    },
                    nexthops: vec![Nexthop::Blackhole],
                },
                Vec::new(),
            ),
            None => Outcome::Unattributed(Unattributed::NoTable),
        }
    }
}

type Users<K> = FastMap<K, FastSet<ZKey>>;

/// Withdraw a model route: only the zebra route that owns it may.
fn withdraw(by_model: &mut FastMap<MKey, ZKey>, z: ZKey, key: RouteKey, out: &mut ChangeBatch) {
    if by_model.get(&MKey(key)) == Some(&z) {
        by_model.remove(&MKey(key));
        out.put(key, Change::DeleteRoute(key));
    }
}

fn index<K: std::hash::Hash + Eq + Copy>(users: &mut Users<K>, keys: &[K], z: ZKey) {
    for k in keys {
        users.entry(*k).or_default().insert(z);
    }
}

fn unindex<K: std::hash::Hash + Eq + Copy>(users: &mut Users<K>, keys: &[K], z: ZKey) {
    for k in keys {
        if let Some(s) = users.get_mut(k) {
            s.remove(&z);
            if s.is_empty() {
                users.remove(k);
            }
        }
    }
}

fn nexthop_id(n: &RouteNexthops) -> Option<u32> {
    match *n {
        RouteNexthops::Id(id) => Some(id),
        RouteNexthops::Paths(_) => None,
    }
}

fn installed_key(s: &RouteState) -> Option<RouteKey> {
    match s {
        RouteState::Installed(k) => Some(*k),
        RouteState::Pending { installed, .. } => *installed,
        RouteState::Unattributed(_) => None,
    }
}

/// An EVPN router MAC: an `AF_BRIDGE` entry with a MAC and an IPv4 remote VTEP.
fn router_mac(n: &NeighbourUpdate) -> Option<(Ipv4Addr, MacAddr)> {
    match (n.family, n.dst, n.mac) {
        (AF_BRIDGE, Some(IpAddr::V4(vtep)), Some(mac)) if !mac.is_multicast() => Some((vtep, mac)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::fpm::decode::{NexthopUpdate, RouteDelete};

    const MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 1]);
    const RMAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x99]);

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn attr() -> StaticAttribution {
        let mut a = StaticAttribution {
            default_mac: Some(MAC),
            ..Default::default()
        };
        a.tables.insert(254, TableId(254));
        a.vnis.insert(10100, TableId(1001));
        a.ifindex_tables.insert(7, TableId(1002)); // a netns VRF's interface
        a.ports.insert(2, PortId(0));
        a.ports.insert(3, PortId(1));
        a.ports.insert(7, PortId(2));
        a
    }

    fn path(gw: &str, ifindex: u32) -> PathSpec {
        PathSpec {
            gateway: Some(gw.parse().unwrap()),
            ifindex,
            vni: None,
            weight: 1,
        }
    }

    fn route(table: u32, prefix: &str, nexthops: RouteNexthops) -> FpmEvent {
        FpmEvent::Route(RouteUpdate {
            table,
            prefix: p(prefix),
            protocol: 186,
            kind: RouteKind::Unicast,
            replace: true,
            metric: None,
            nexthops,
        })
    }

    fn nh(id: u32, kind: NexthopKind) -> FpmEvent {
        FpmEvent::Nexthop(NexthopUpdate {
            id,
            protocol: 186,
            kind,
        })
    }

    fn underlay(gw: &str, port: u16) -> Nexthop {
        Nexthop::Underlay {
            gateway: gw.parse().unwrap(),
            port: PortId(port),
            mac: MAC,
        }
    }

    fn run(rib: &mut Rib, a: &StaticAttribution, evs: &[FpmEvent]) -> Vec<Change> {
        let mut b = ChangeBatch::new();
        rib.apply_all(evs, a, &mut b);
        b.take()
    }

    #[test]
    fn routes_on_no_dpu_are_journaled_with_why_when_tracked() {
        let a = attr();
        let mut rib = Rib::new();
        rib.track_not_taken();
        let connected = RouteNexthops::Paths(vec![PathSpec {
            gateway: None,
            ifindex: 2,
            vni: None,
            weight: 1,
        }]);
        run(
            &mut rib,
            &a,
            &[
                route(254, "10.0.0.0/24", connected.clone()),
                route(
                    254,
                    "10.9.0.0/24",
                    RouteNexthops::Paths(vec![path("10.0.0.1", 99)]),
                ),
                route(254, "10.1.0.0/24", RouteNexthops::Id(40)),
                route(
                    254,
                    "10.2.0.0/24",
                    RouteNexthops::Paths(vec![path("10.0.0.1", 2)]),
                ),
            ],
        );
        let j = rib.take_not_taken();
        let codes: Vec<(String, &str)> = j
            .iter()
            .map(|(z, n)| (z.prefix.to_string(), n.map_or("taken", |n| n.code())))
            .collect();
        assert_eq!(
            codes,
            vec![
                ("10.0.0.0/24".to_owned(), "connected"),
                ("10.9.0.0/24".to_owned(), "no_port"),
                ("10.1.0.0/24".to_owned(), "pending_nexthop"),
            ]
        );
        assert!(j[0]
            .1
            .unwrap()
            .to_string()
            .contains("connected route: not ours"));
        assert_eq!(rib.not_taken().count(), 3);
        // Replayed unchanged: nothing new. Taken, and deleted: journaled.
        run(&mut rib, &a, &[route(254, "10.0.0.0/24", connected)]);
        assert!(rib.take_not_taken().is_empty());
        run(
            &mut rib,
            &a,
            &[
                nh(40, NexthopKind::Single(path("10.0.0.1", 2))),
                FpmEvent::RouteDeleted(RouteDelete {
                    table: 254,
                    prefix: p("10.9.0.0/24"),
                    protocol: 186,
                }),
            ],
        );
        let j = rib.take_not_taken();
        assert_eq!(j.len(), 2);
        assert!(j.iter().all(|(_, n)| n.is_none()));
        assert_eq!(rib.not_taken().count(), 1);
        // Untracked, nothing is kept.
        let mut quiet = Rib::new();
        run(
            &mut quiet,
            &a,
            &[route(254, "10.1.0.0/24", RouteNexthops::Id(41))],
        );
        assert!(quiet.take_not_taken().is_empty());
    }

    #[test]
    fn feedback_is_due_once_per_status_and_again_after_a_resend_or_reconnect() {
        let a = attr();
        let mut rib = Rib::new();
        let r = route(
            254,
            "10.2.0.0/24",
            RouteNexthops::Paths(vec![path("10.0.0.1", 2)]),
        );
        run(&mut rib, &a, std::slice::from_ref(&r));
        let k = RouteKey {
            table: TableId(254),
            prefix: p("10.2.0.0/24"),
        };
        assert!(rib.feedback_due(&k, 0x4000));
        rib.note_feedback(&k, 0x4000);
        assert!(!rib.feedback_due(&k, 0x4000));
        assert!(rib.feedback_due(&k, 0x2000_0000), "a changed status is due");
        // zebra sends the route again (a new route entry in zebra, with no flags).
        run(&mut rib, &a, std::slice::from_ref(&r));
        assert!(rib.feedback_due(&k, 0x4000));
        rib.note_feedback(&k, 0x4000);
        rib.forget_feedback();
        assert!(rib.feedback_due(&k, 0x4000));
        // A route zebra does not have is never due.
        let other = RouteKey {
            table: TableId(254),
            prefix: p("10.3.0.0/24"),
        };
        assert!(!rib.feedback_due(&other, 0x4000));
    }

    #[test]
    fn undefined_nexthop_id_is_pending_until_it_arrives() {
        let a = attr();
        let mut rib = Rib::new();
        let out = run(
            &mut rib,
            &a,
            &[route(254, "10.1.0.0/24", RouteNexthops::Id(40))],
        );
        assert!(out.is_empty());
        assert_eq!(rib.stats().pending, 1);
        assert_eq!(rib.stats().unknown_nexthop_refs, 1);
        let out = run(
            &mut rib,
            &a,
            &[
                nh(41, NexthopKind::Single(path("10.0.0.1", 2))),
                nh(42, NexthopKind::Single(path("10.0.1.1", 3))),
                nh(40, NexthopKind::Group(vec![(41, 1), (42, 1)])),
            ],
        );
        let key = RouteKey {
            table: TableId(254),
            prefix: p("10.1.0.0/24"),
        };
        assert_eq!(
            out,
            vec![Change::UpsertRoute(Route {
                key,
                nexthops: vec![underlay("10.0.0.1", 0), underlay("10.0.1.1", 1)],
            })]
        );
        assert_eq!(rib.stats().pending, 0);
        // A member changes: the route follows.
        let out = run(
            &mut rib,
            &a,
            &[nh(42, NexthopKind::Single(path("10.0.1.2", 3)))],
        );
        assert_eq!(
            out,
            vec![Change::UpsertRoute(Route {
                key,
                nexthops: vec![underlay("10.0.0.1", 0), underlay("10.0.1.2", 1)],
            })]
        );
        assert_eq!(
            rib.zebra_route(&key),
            Some(ZebraRoute {
                table: 254,
                prefix: p("10.1.0.0/24"),
                protocol: 186
            })
        );
    }

    /// A reconnect replays every nexthop unchanged: no route is re-evaluated or re-sent.
    #[test]
    fn unchanged_nexthop_replay_changes_nothing() {
        let a = attr();
        let mut rib = Rib::new();
        let def = nh(41, NexthopKind::Single(path("10.0.0.1", 2)));
        run(
            &mut rib,
            &a,
            &[
                def.clone(),
                route(254, "10.1.0.0/24", RouteNexthops::Id(41)),
            ],
        );
        assert!(run(&mut rib, &a, std::slice::from_ref(&def)).is_empty());
        // The route replayed unchanged is not re-sent either.
        assert!(run(
            &mut rib,
            &a,
            &[route(254, "10.1.0.0/24", RouteNexthops::Id(41))]
        )
        .is_empty());
        // An attribution change is applied on request.
        let mut moved = a.clone();
        moved.ports.insert(2, PortId(5));
        let mut b = ChangeBatch::new();
        rib.reevaluate_all(&moved, &mut b);
        assert!(
            matches!(b.changes(), [Change::UpsertRoute(r)] if r.nexthops == [Nexthop::Underlay {
            gateway: "10.0.0.1".parse().unwrap(), port: PortId(5), mac: MAC }])
        );
        let changed = nh(41, NexthopKind::Single(path("10.0.0.9", 2)));
        assert_eq!(run(&mut rib, &moved, &[changed]).len(), 1);
    }

    /// 8.4's update is DELROUTE + NEWROUTE: the batch carries one upsert, never a delete.
    #[test]
    fn delete_then_add_coalesces() {
        let a = attr();
        let mut rib = Rib::new();
        let r = route(
            254,
            "10.2.0.0/16",
            RouteNexthops::Paths(vec![path("10.0.0.1", 2)]),
        );
        run(&mut rib, &a, std::slice::from_ref(&r));
        let del = FpmEvent::RouteDeleted(RouteDelete {
            table: 254,
            prefix: p("10.2.0.0/16"),
            protocol: 186,
        });
        let out = run(&mut rib, &a, &[del.clone(), r]);
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Change::UpsertRoute(_)));
        let out = run(&mut rib, &a, std::slice::from_ref(&del));
        assert_eq!(
            out,
            vec![Change::DeleteRoute(RouteKey {
                table: TableId(254),
                prefix: p("10.2.0.0/16")
            })]
        );
        run(&mut rib, &a, &[del]);
        assert_eq!(rib.stats().unknown_deletes, 1);
    }

    #[test]
    fn evpn_route_waits_for_router_mac() {
        let a = attr();
        let mut rib = Rib::new();
        let vx = PathSpec {
            gateway: Some("192.0.2.7".parse().unwrap()),
            ifindex: 12,
            vni: Some(10100),
            weight: 1,
        };
        let out = run(
            &mut rib,
            &a,
            &[route(254, "172.16.0.0/16", RouteNexthops::Paths(vec![vx]))],
        );
        assert!(out.is_empty());
        assert!(matches!(
            rib.state(254, p("172.16.0.0/16")),
            Some(RouteState::Pending {
                waiting: Wait::RouterMac(_),
                ..
            })
        ));
        let out = run(
            &mut rib,
            &a,
            &[FpmEvent::Neighbour(NeighbourUpdate {
                family: AF_BRIDGE,
                ifindex: 12,
                state: 0x80,
                mac: Some(RMAC),
                dst: Some("192.0.2.7".parse().unwrap()),
                vni: None,
                vlan: None,
            })],
        );
        assert_eq!(
            out,
            vec![Change::UpsertRoute(Route {
                key: RouteKey {
                    table: TableId(1001),
                    prefix: p("172.16.0.0/16")
                },
                nexthops: vec![Nexthop::Vxlan {
                    vni: Vni::new(10100).unwrap(),
                    remote_vtep: "192.0.2.7".parse().unwrap(),
                    router_mac: RMAC
                }],
            })]
        );
    }

    #[test]
    fn attribution_by_interface_blackholes_and_unattributed() {
        let a = attr();
        let mut rib = Rib::new();
        let mut bh = RouteUpdate {
            table: 254,
            prefix: p("192.0.2.0/24"),
            protocol: 196,
            kind: RouteKind::Blackhole,
            replace: false,
            metric: None,
            nexthops: RouteNexthops::Paths(vec![]),
        };
        let out = run(
            &mut rib,
            &a,
            &[
                // netns VRF: table 254 but an interface of VPC table 1002.
                route(
                    254,
                    "10.50.0.0/16",
                    RouteNexthops::Paths(vec![path("10.7.0.1", 7)]),
                ),
                FpmEvent::Route(bh.clone()),
                // Interface 99 is not a DPU port; a connected route has no gateway.
                route(
                    254,
                    "10.60.0.0/16",
                    RouteNexthops::Paths(vec![path("10.9.0.1", 99)]),
                ),
                route(
                    254,
                    "10.70.0.0/24",
                    RouteNexthops::Paths(vec![PathSpec {
                        gateway: None,
                        ifindex: 2,
                        vni: None,
                        weight: 1,
                    }]),
                ),
            ],
        );
        assert_eq!(out.len(), 2);
        assert!(out.contains(&Change::UpsertRoute(Route {
            key: RouteKey {
                table: TableId(1002),
                prefix: p("10.50.0.0/16")
            },
            nexthops: vec![underlay("10.7.0.1", 2)],
        })));
        assert!(out.contains(&Change::UpsertRoute(Route {
            key: RouteKey {
                table: TableId(254),
                prefix: p("192.0.2.0/24")
            },
            nexthops: vec![Nexthop::Blackhole],
        })));
        assert_eq!(
            rib.state(254, p("10.60.0.0/16")),
            Some(RouteState::Unattributed(Unattributed::NoPort(99)))
        );
        assert_eq!(
            rib.state(254, p("10.70.0.0/24")),
            Some(RouteState::Unattributed(Unattributed::Connected))
        );
        assert_eq!(rib.stats().unattributed, 2);
        // The blackhole becomes unattributed (table unknown): it is withdrawn.
        bh.table = 77;
        bh.prefix = p("192.0.2.0/24");
        let mut b = ChangeBatch::new();
        rib.apply(&FpmEvent::Route(bh), &a, &mut b);
        assert!(b.is_empty(), "a different zebra table is a different route");
    }

    #[test]
    fn resync_removes_routes_not_replayed() {
        let a = attr();
        let mut rib = Rib::new();
        let r1 = route(
            254,
            "10.1.0.0/24",
            RouteNexthops::Paths(vec![path("10.0.0.1", 2)]),
        );
        let r2 = route(
            254,
            "10.2.0.0/24",
            RouteNexthops::Paths(vec![path("10.0.0.1", 2)]),
        );
        run(&mut rib, &a, &[r1.clone(), r2]);
        rib.begin_resync();
        run(&mut rib, &a, &[r1]);
        let mut b = ChangeBatch::new();
        rib.end_resync(&a, &mut b);
        assert_eq!(
            b.take(),
            vec![Change::DeleteRoute(RouteKey {
                table: TableId(254),
                prefix: p("10.2.0.0/24")
            })]
        );
        assert_eq!(rib.stats().routes, 1);
    }
}
