//! Desired state, validated on entry.

use serde::{Deserialize, Serialize};

/// A meter's token-bucket parameters. Rates are in bytes per second and bursts in bytes, as in
/// `rte_mtr`. Colour-blind: the packet's incoming colour is not consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MeterProfile {
    /// Single-rate three-colour marker, RFC 2697.
    SrTcm {
        /// Committed information rate, bytes/s.
        cir: u64,
        /// Committed burst size, bytes.
        cbs: u64,
        /// Excess burst size, bytes.
        ebs: u64,
    },
    /// Two-rate three-colour marker, RFC 2698.
    TrTcm {
        /// Committed information rate, bytes/s.
        cir: u64,
        /// Committed burst size, bytes.
        cbs: u64,
        /// Peak information rate, bytes/s (≥ cir).
        pir: u64,
        /// Peak burst size, bytes.
        pbs: u64,
    },
}

impl MeterProfile {
    /// Largest accepted rate: 800 Gbit/s in bytes per second.
    pub const MAX_RATE: u64 = 100_000_000_000;
    /// Largest accepted burst: 1 GiB.
    pub const MAX_BURST: u64 = 1 << 30;
    /// Smallest accepted committed burst: one full-size Ethernet frame, so a conforming
    /// packet can ever be green (RFC 2697 §2 recommends at least the largest packet).
    pub const MIN_BURST: u64 = 1518;

    fn validate(&self) -> Result<(), (&'static str, Problem)> {
        let rate = |field, v: u64| {
            if v == 0 {
                Err((field, Problem::Zero))
            } else if v > Self::MAX_RATE {
                Err((
                    field,
                    Problem::TooLarge {
                        max: Self::MAX_RATE,
                    },
                ))
            } else {
                Ok(())
            }
        };
        let burst = |field, v: u64, min: u64| {
            if v < min {
                Err((field, Problem::TooSmall { min }))
            } else if v > Self::MAX_BURST {
                Err((
                    field,
                    Problem::TooLarge {
                        max: Self::MAX_BURST,
                    },
                ))
            } else {
                Ok(())
            }
        };
        match *self {
            MeterProfile::SrTcm { cir, cbs, ebs } => {
                rate("cir", cir)?;
                burst("cbs", cbs, Self::MIN_BURST)?;
                burst("ebs", ebs, 0)
            }
            MeterProfile::TrTcm { cir, cbs, pir, pbs } => {
                rate("cir", cir)?;
                rate("pir", pir)?;
                if pir < cir {
                    return Err(("pir", Problem::TooSmall { min: cir }));
                }
                burst("cbs", cbs, Self::MIN_BURST)?;
                burst("pbs", pbs, Self::MIN_BURST)
            }
        }
    }
}

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use core::str::FromStr;
use std::collections::{BTreeMap, BTreeSet};

/// The kernel's main table: the underlay VRF.
pub const UNDERLAY_TABLE: TableId = TableId(254);
/// The most nexthops one route may carry.
pub const MAX_ECMP: usize = 16;

/// A MAC address.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl MacAddr {
    /// Multicast (and broadcast) addresses cannot be a router's or neighbour's address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

/// A DPU port number (the DPDK port id on the DPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortId(pub u16);

/// A routing table id: 254 is the underlay, each VPC has its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableId(pub u32);

impl TableId {
    /// Table ids above this do not fit the 20 bits the compiler uses in group numbers.
    pub const MAX: u32 = (1 << 20) - 1;
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "table {}", self.0)
    }
}

/// A VXLAN network identifier, 1..=2^24-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Vni(u32);

impl Vni {
    /// A VNI, if `v` is in range.
    pub fn new(v: u32) -> Result<Vni, Problem> {
        if v == 0 || v > 0x00ff_ffff {
            Err(Problem::OutOfRange {
                min: 1,
                max: 0x00ff_ffff,
            })
        } else {
            Ok(Vni(v))
        }
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Vni {
    type Error = Problem;
    fn try_from(v: u32) -> Result<Self, Problem> {
        Vni::new(v)
    }
}

impl From<Vni> for u32 {
    fn from(v: Vni) -> u32 {
        v.0
    }
}

/// An object name: 1–63 characters of `[a-z0-9._-]`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// A name, if `s` is acceptable.
    pub fn new(s: &str) -> Result<Name, Problem> {
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
        let first_ok = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if s.is_empty() || s.len() > 63 || !first_ok || !s.chars().all(ok_char) {
            Err(Problem::BadName)
        } else {
            Ok(Name(s.to_owned()))
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = Problem;
    fn try_from(s: String) -> Result<Self, Problem> {
        Name::new(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An IPv4 or IPv6 prefix with no host bits set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "(IpAddr, u8)", into = "(IpAddr, u8)")]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

// `len` is the prefix length, not a collection size.
#[allow(clippy::len_without_is_empty)]
impl Prefix {
    /// A prefix; refuses lengths beyond the family and set host bits.
    pub fn new(addr: IpAddr, len: u8) -> Result<Prefix, Problem> {
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if len > max {
            return Err(Problem::OutOfRange {
                min: 0,
                max: u64::from(max),
            });
        }
        let p = Prefix { addr, len };
        if p.network() != addr {
            return Err(Problem::HostBitsSet {
                network: Prefix {
                    addr: p.network(),
                    len,
                },
            });
        }
        Ok(p)
    }

    /// An IPv4 prefix.
    pub fn v4(addr: Ipv4Addr, len: u8) -> Result<Prefix, Problem> {
        Prefix::new(IpAddr::V4(addr), len)
    }

    /// An IPv6 prefix.
    pub fn v6(addr: Ipv6Addr, len: u8) -> Result<Prefix, Problem> {
        Prefix::new(IpAddr::V6(addr), len)
    }

    /// The address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The length.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is IPv4.
    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The address family's width: 32 or 128.
    pub fn max_len(&self) -> u8 {
        if self.is_v4() {
            32
        } else {
            128
        }
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.len))),
        }
    }

    /// Whether `ip` lies inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask32(self.len) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask128(self.len) == u128::from(n),
            _ => false,
        }
    }

    /// Whether `other` lies entirely inside this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    /// The prefix of length `len` (≤ this one's) containing this one.
    pub fn truncate(&self, len: u8) -> Prefix {
        let len = len.min(self.len);
        let p = Prefix {
            addr: self.addr,
            len,
        };
        Prefix {
            addr: p.network(),
            len,
        }
    }
}

/// The netmask of an IPv4 prefix length.
pub fn mask32(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

/// The netmask of an IPv6 prefix length.
pub fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

impl TryFrom<(IpAddr, u8)> for Prefix {
    type Error = Problem;
    fn try_from((a, l): (IpAddr, u8)) -> Result<Self, Problem> {
        Prefix::new(a, l)
    }
}

impl From<Prefix> for (IpAddr, u8) {
    fn from(p: Prefix) -> (IpAddr, u8) {
        (p.addr, p.len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Prefix {
    type Err = Problem;
    fn from_str(s: &str) -> Result<Prefix, Problem> {
        let (a, l) = s.split_once('/').ok_or(Problem::BadSyntax)?;
        let addr: IpAddr = a.parse().map_err(|_| Problem::BadSyntax)?;
        let len: u8 = l.parse().map_err(|_| Problem::BadSyntax)?;
        Prefix::new(addr, len)
    }
}

/// An inclusive IPv4 address range (a NAT pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ipv4Range {
    /// First address.
    pub first: Ipv4Addr,
    /// Last address (≥ first).
    pub last: Ipv4Addr,
}

impl Ipv4Range {
    /// The largest pool accepted: a /16.
    pub const MAX_ADDRESSES: u32 = 1 << 16;

    /// One address.
    pub fn single(a: Ipv4Addr) -> Ipv4Range {
        Ipv4Range { first: a, last: a }
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        u64::from(u32::from(self.last)).saturating_sub(u64::from(u32::from(self.first))) + 1
    }

    /// Whether two ranges share an address.
    pub fn overlaps(&self, o: &Ipv4Range) -> bool {
        self.first <= o.last && o.first <= self.last
    }

    /// Whether `a` is inside.
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        self.first <= a && a <= self.last
    }

    /// The addresses, in order.
    pub fn iter(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(Ipv4Addr::from)
    }

    /// The smallest list of prefixes covering exactly this range.
    pub fn to_prefixes(&self) -> Vec<Prefix> {
        let mut out = Vec::new();
        let mut lo = u64::from(u32::from(self.first));
        let hi = u64::from(u32::from(self.last));
        while lo <= hi {
            let mut len = 32u8;
            // Grow the block while it stays aligned and inside the range.
            while len > 0 {
                let size = 1u64 << (33 - u32::from(len));
                if lo % size != 0 || lo + size - 1 > hi {
                    break;
                }
                len -= 1;
            }
            let size = 1u64 << (32 - u32::from(len));
            let addr = Ipv4Addr::from(lo as u32);
            if let Ok(p) = Prefix::v4(addr, len) {
                out.push(p);
            }
            lo += size;
        }
        out
    }
}

/// The DPU itself: its underlay identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    /// Local VXLAN tunnel endpoint (IPv4 underlay).
    pub vtep: Ipv4Addr,
    /// Our router MAC: source of every frame we route, inner and outer.
    pub router_mac: MacAddr,
    /// Ports facing the underlay.
    pub uplinks: BTreeSet<PortId>,
}

/// A VPC: a tenant VRF carried over EVPN type-5 with its own L3 VNI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Vpc {
    /// Unique name.
    pub name: Name,
    /// The L3 VNI, unique.
    pub vni: Vni,
    /// The VRF table, unique, not the underlay's.
    pub table: TableId,
    /// DPU ports whose traffic belongs to this VPC.
    pub ports: BTreeSet<PortId>,
}

/// Where a route sends traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Nexthop {
    /// An underlay gateway on a port; `mac` is its resolved link-layer address.
    Underlay {
        /// The gateway's address.
        gateway: IpAddr,
        /// The port toward it.
        port: PortId,
        /// Its MAC.
        mac: MacAddr,
    },
    /// A remote VTEP over VXLAN (EVPN type-5).
    Vxlan {
        /// The VNI to encapsulate with: the L3 VNI of a known VPC.
        vni: Vni,
        /// The remote tunnel endpoint, resolved through the underlay.
        remote_vtep: Ipv4Addr,
        /// The remote router MAC (inner destination).
        router_mac: MacAddr,
    },
    /// Continue the lookup in the underlay table (a VPC's breakout to the outside, where its
    /// NAT rules apply).
    Vrf {
        /// The table: only the underlay is accepted.
        table: TableId,
    },
    /// Drop.
    Blackhole,
}

/// A route key: a prefix in a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteKey {
    /// The VRF table.
    pub table: TableId,
    /// The prefix.
    pub prefix: Prefix,
}

/// A route: a prefix in a table with one to [`MAX_ECMP`] nexthops.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Route {
    /// Table and prefix.
    pub key: RouteKey,
    /// ECMP set: all of one kind; `Vrf` and `Blackhole` stand alone.
    pub nexthops: Vec<Nexthop>,
}

/// A NAT rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NatRule {
    /// Unique name.
    pub name: Name,
    /// The VPC whose traffic it translates on breakout.
    pub vpc: Name,
    /// What it does.
    pub kind: NatKind,
}

/// The kinds of NAT.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NatKind {
    /// Static 1:1 IPv4.
    Static44 {
        /// The VPC-side address.
        inside: Ipv4Addr,
        /// The public address.
        outside: Ipv4Addr,
    },
    /// Static 1:1 IPv6.
    Static66 {
        /// The VPC-side address.
        inside: Ipv6Addr,
        /// The public address.
        outside: Ipv6Addr,
    },
    /// Port address translation of every other IPv4 source of the VPC.
    Napt44 {
        /// Public addresses.
        pool: Ipv4Range,
        /// Inclusive port range.
        ports: (u16, u16),
    },
    /// Stateful NAT64 (RFC 6146) toward IPv4 destinations embedded under `prefix` (RFC 6052).
    Nat64 {
        /// The NAT64 prefix, e.g. 64:ff9b::/96.
        prefix: Prefix,
        /// Public IPv4 addresses.
        pool: Ipv4Range,
        /// Inclusive port range.
        ports: (u16, u16),
    },
}

impl NatKind {
    /// The IPv4 outside addresses the rule owns (for overlap checks and reverse lookups).
    pub fn outside_v4(&self) -> Option<Ipv4Range> {
        match *self {
            NatKind::Static44 { outside, .. } => Some(Ipv4Range::single(outside)),
            NatKind::Napt44 { pool, .. } | NatKind::Nat64 { pool, .. } => Some(pool),
            NatKind::Static66 { .. } => None,
        }
    }
}

/// What a meter polices.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MeterTarget {
    /// Everything the VPC's hosts send (ingress on its ports).
    Vpc(Name),
    /// Traffic forwarded by one route.
    Route(RouteKey),
}

/// A meter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Meter {
    /// Unique name.
    pub name: Name,
    /// Rates and bursts.
    pub profile: MeterProfile,
    /// What it polices; one meter per target.
    pub target: MeterTarget,
}

/// The identity of any object, as status reports and errors name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ObjectKey {
    /// The node settings.
    Node,
    /// A VPC.
    Vpc(Name),
    /// A route.
    Route(RouteKey),
    /// A NAT rule.
    Nat(Name),
    /// A meter.
    Meter(Name),
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKey::Node => f.write_str("node"),
            ObjectKey::Vpc(n) => write!(f, "vpc {n}"),
            ObjectKey::Route(k) => write!(f, "route {} in {}", k.prefix, k.table),
            ObjectKey::Nat(n) => write!(f, "nat {n}"),
            ObjectKey::Meter(n) => write!(f, "meter {n}"),
        }
    }
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Problem {
    /// Host bits set in a prefix.
    #[error("host bits set (did you mean {network}?)")]
    HostBitsSet {
        /// The prefix with host bits cleared.
        network: Prefix,
    },
    /// A number outside its range.
    #[error("out of range {min}..={max}")]
    OutOfRange {
        /// Lowest accepted.
        min: u64,
        /// Highest accepted.
        max: u64,
    },
    /// Not parseable.
    #[error("syntax error")]
    BadSyntax,
    /// A name that does not follow the naming rule.
    #[error(
        "names are 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
    )]
    BadName,
    /// Zero where a positive value is needed.
    #[error("must not be zero")]
    Zero,
    /// Too small.
    #[error("must be at least {min}")]
    TooSmall {
        /// The minimum.
        min: u64,
    },
    /// Too large.
    #[error("must be at most {max}")]
    TooLarge {
        /// The maximum.
        max: u64,
    },
    /// The VNI belongs to another VPC.
    #[error("VNI already used by vpc {other}")]
    DuplicateVni {
        /// The VPC that has it.
        other: Name,
    },
    /// The table belongs to another VPC or is reserved.
    #[error("table already used by {other}")]
    DuplicateTable {
        /// Who has it.
        other: ObjectKey,
    },
    /// A port already bound elsewhere.
    #[error("port {port} already belongs to {other}")]
    PortInUse {
        /// The port.
        port: u16,
        /// Who has it.
        other: ObjectKey,
    },
    /// No such table / VNI / VPC / route.
    #[error("refers to unknown {0}")]
    Unknown(ObjectKeyOrTable),
    /// An address that cannot be used here (unspecified, multicast, wrong family).
    #[error("address not usable here")]
    BadAddress,
    /// Overlapping NAT address pools.
    #[error("overlaps the addresses of {other}")]
    Overlaps {
        /// The other rule.
        other: ObjectKey,
    },
    /// A duplicate of something unique.
    #[error("duplicates {other}")]
    Duplicate {
        /// The other object.
        other: ObjectKey,
    },
    /// An empty list or a list with too many members.
    #[error("needs between {min} and {max} entries")]
    Count {
        /// Least.
        min: usize,
        /// Most.
        max: usize,
    },
    /// Nexthops of different kinds in one ECMP set, or `Vrf`/`Blackhole` not alone.
    /// A port the DPU does not have as an uplink.
    #[error("port {0} is not an uplink of this DPU")]
    NotAnUplink(u16),
    /// A port the DPU does not have as a VPC-facing port.
    #[error("port {0} is not a VPC-facing port of this DPU")]
    NotAVpcPort(u16),
    #[error("nexthops must be all underlay or all VXLAN; vrf and blackhole stand alone")]
    MixedNexthops,
    /// A RFC 6052 prefix length other than 32, 40, 48, 56, 64 or 96.
    #[error("NAT64 prefix length must be 32, 40, 48, 56, 64 or 96")]
    Nat64PrefixLength,
    // New variants go last: the wire encodes the variant index.
    /// A table id the kernel or the underlay reserves.
    #[error("table {0} is reserved (253 default, 254 main/underlay, 255 local)")]
    ReservedTable(u32),
    /// A range whose first element is above its last.
    #[error("reversed range: first {first} is above last {last}")]
    Reversed {
        /// The first element, as written.
        first: String,
        /// The last element, as written.
        last: String,
    },
    /// The same next hop twice in one ECMP set.
    #[error("duplicates next hop {index} of the same route")]
    DuplicateNexthop {
        /// The index of the first occurrence.
        index: usize,
    },
    /// An IPv6 route through an IPv4 gateway (the reverse, an IPv4 route through an IPv6
    /// gateway, is RFC 8950 / BGP unnumbered, and is accepted).
    #[error("an IPv6 route cannot have an IPv4 gateway")]
    WrongFamily,
    /// A VXLAN next hop carrying the VNI of a VPC other than the route's own: it would put
    /// this VPC's traffic into another tenant's network.
    #[error("VNI {vni} belongs to vpc {owner}, not to this route's vpc {vpc}")]
    ForeignVni {
        /// The VNI.
        vni: u32,
        /// The VPC that owns it.
        owner: Name,
        /// The route's VPC.
        vpc: Name,
    },
    /// A remote VTEP equal to this node's own VTEP.
    #[error("is this node's own VTEP")]
    OwnVtep,
    /// RFC 6052 §2.2: bits 64 to 71 of a NAT64 prefix (the "u" octet) must be zero.
    #[error("bits 64-71 of a NAT64 prefix must be zero (RFC 6052 section 2.2)")]
    Nat64UOctet,
    /// A VRF next hop in the underlay table, which can only lead to itself.
    #[error("a VRF next hop leads from a VPC table to the underlay table; it cannot be used in the underlay table itself")]
    VrfInUnderlay,
    /// An uplink used as the port of a next hop in a VPC table.
    #[error("port {0} is an uplink; next hops in a VPC table leave through the VPC's own ports")]
    UplinkInVpc(u16),
}

/// What an unknown reference named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectKeyOrTable {
    /// An object.
    Object(ObjectKey),
    /// A table.
    Table(TableId),
    /// A VNI.
    Vni(u32),
    /// A port that is not an uplink.
    Uplink(PortId),
}

impl fmt::Display for ObjectKeyOrTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKeyOrTable::Object(o) => write!(f, "{o}"),
            ObjectKeyOrTable::Table(t) => write!(f, "{t}"),
            ObjectKeyOrTable::Vni(v) => write!(f, "VNI {v} (no VPC has it)"),
            ObjectKeyOrTable::Uplink(p) => write!(f, "port {} (not an uplink)", p.0),
        }
    }
}

/// Why a change was refused. Nothing of the refused batch was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ModelError {
    /// A field is wrong.
    #[error("{object}: field `{field}`: {problem}")]
    Invalid {
        /// The object.
        object: ObjectKey,
        /// The field, as named in the API (`nexthops[1].vni`).
        field: String,
        /// What is wrong.
        problem: Problem,
    },
    /// Deleting something that does not exist.
    #[error("{object}: not found")]
    NotFound {
        /// The object.
        object: ObjectKey,
    },
    /// Deleting something others still refer to.
    #[error("{object}: still used by {by}")]
    InUse {
        /// The object.
        object: ObjectKey,
        /// One user.
        by: ObjectKey,
    },
    /// Which change of a batch failed.
    #[error("change {index}: {source}")]
    InBatch {
        /// Index in the batch.
        index: usize,
        /// The error.
        source: Box<ModelError>,
    },
}

fn invalid(object: ObjectKey, field: impl Into<String>, problem: Problem) -> ModelError {
    ModelError::Invalid {
        object,
        field: field.into(),
        problem,
    }
}

/// One change to the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Set the node settings.
    SetNode(Node),
    /// Create or replace a VPC.
    UpsertVpc(Vpc),
    /// Delete a VPC (refused while routes, NAT rules or meters refer to it).
    DeleteVpc(Name),
    /// Create or replace a route.
    UpsertRoute(Route),
    /// Delete a route.
    DeleteRoute(RouteKey),
    /// Create or replace a NAT rule.
    UpsertNat(NatRule),
    /// Delete a NAT rule.
    DeleteNat(Name),
    /// Create or replace a meter.
    UpsertMeter(Meter),
    /// Delete a meter.
    DeleteMeter(Name),
}

impl Change {
    /// The object the change is about.
    pub fn object(&self) -> ObjectKey {
        match self {
            Change::SetNode(_) => ObjectKey::Node,
            Change::UpsertVpc(v) => ObjectKey::Vpc(v.name.clone()),
            Change::DeleteVpc(n) => ObjectKey::Vpc(n.clone()),
            Change::UpsertRoute(r) => ObjectKey::Route(r.key),
            Change::DeleteRoute(k) => ObjectKey::Route(*k),
            Change::UpsertNat(n) => ObjectKey::Nat(n.name.clone()),
            Change::DeleteNat(n) => ObjectKey::Nat(n.clone()),
            Change::UpsertMeter(m) => ObjectKey::Meter(m.name.clone()),
            Change::DeleteMeter(n) => ObjectKey::Meter(n.clone()),
        }
    }
}

/// The validated desired state of one DPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    node: Option<Node>,
    vpcs: BTreeMap<Name, Vpc>,
    routes: BTreeMap<RouteKey, Route>,
    nat: BTreeMap<Name, NatRule>,
    meters: BTreeMap<Name, Meter>,
}

/// The inverse of an applied change, for rolling a failed batch back.
enum Undo {
    Node(Option<Node>),
    Vpc(Name, Option<Vpc>),
    Route(RouteKey, Option<Route>),
    Nat(Name, Option<NatRule>),
    Meter(Name, Option<Meter>),
}

impl Model {
    /// The changes that build this model from an empty one, in an order [`Model::apply`]
    /// accepts (node, VPCs, routes, NAT rules, meters).
    pub fn to_changes(&self) -> Vec<Change> {
        Model::new().changes_to(self).unwrap_or_default()
    }

    /// The changes that turn this model into `target` (set differences per object kind), in
    /// an order [`Model::apply`] accepts: the node, VPC upserts, route upserts, NAT and meter
    /// upserts, then deletions in reverse dependency order (meters, NAT rules, routes, VPCs).
    /// `None` when the difference cannot be expressed as changes (the node removed): send the
    /// whole target instead. Whether the batch validates is still up to `apply` (a VPC moved
    /// to another table while routes use the old one is refused; a full resync then works).
    pub fn changes_to(&self, target: &Model) -> Option<Vec<Change>> {
        /// One merge-join pass over two ordered maps (no per-key lookups): upserts for keys
        /// new or changed in `new`, deletes for keys gone from it, both in key order.
        fn diff<K: Ord + Clone, V: PartialEq + Clone>(
            old: &BTreeMap<K, V>,
            new: &BTreeMap<K, V>,
            up: impl Fn(V) -> Change,
            del: impl Fn(K) -> Change,
        ) -> (Vec<Change>, Vec<Change>) {
            let (mut ups, mut dels) = (Vec::new(), Vec::new());
            let mut o = old.iter().peekable();
            let mut n = new.iter().peekable();
            loop {
                match (o.peek(), n.peek()) {
                    (None, None) => break,
                    (Some((ok, _)), None) => {
                        dels.push(del((*ok).clone()));
                        o.next();
                    }
                    (None, Some((_, nv))) => {
                        ups.push(up((*nv).clone()));
                        n.next();
                    }
                    (Some((ok, ov)), Some((nk, nv))) => match ok.cmp(nk) {
                        core::cmp::Ordering::Less => {
                            dels.push(del((*ok).clone()));
                            o.next();
                        }
                        core::cmp::Ordering::Greater => {
                            ups.push(up((*nv).clone()));
                            n.next();
                        }
                        core::cmp::Ordering::Equal => {
                            if ov != nv {
                                ups.push(up((*nv).clone()));
                            }
                            o.next();
                            n.next();
                        }
                    },
                }
            }
            (ups, dels)
        }
        let mut out = Vec::new();
        match (&self.node, &target.node) {
            (Some(_), None) => return None,
            (a, Some(b)) if a.as_ref() != Some(b) => out.push(Change::SetNode(b.clone())),
            _ => {}
        }
        let (vpc_up, vpc_del) = diff(
            &self.vpcs,
            &target.vpcs,
            Change::UpsertVpc,
            Change::DeleteVpc,
        );
        let (route_up, route_del) = diff(
            &self.routes,
            &target.routes,
            Change::UpsertRoute,
            Change::DeleteRoute,
        );
        let (nat_up, nat_del) = diff(&self.nat, &target.nat, Change::UpsertNat, Change::DeleteNat);
        let (meter_up, meter_del) = diff(
            &self.meters,
            &target.meters,
            Change::UpsertMeter,
            Change::DeleteMeter,
        );
        for part in [
            vpc_up, route_up, nat_up, meter_up, meter_del, nat_del, route_del, vpc_del,
        ] {
            out.extend(part);
        }
        Some(out)
    }
}

impl Model {
    /// An empty model.
    pub fn new() -> Model {
        Model::default()
    }

    /// Whether the object `key` names exists.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        match key {
            ObjectKey::Node => self.node.is_some(),
            ObjectKey::Vpc(n) => self.vpcs.contains_key(n),
            ObjectKey::Route(k) => self.routes.contains_key(k),
            ObjectKey::Nat(n) => self.nat_rules().contains_key(n),
            ObjectKey::Meter(n) => self.meters.contains_key(n),
        }
    }

    /// The node settings, if set.
    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// VPCs by name.
    pub fn vpcs(&self) -> &BTreeMap<Name, Vpc> {
        &self.vpcs
    }

    /// Routes by key.
    pub fn routes(&self) -> &BTreeMap<RouteKey, Route> {
        &self.routes
    }

    /// NAT rules by name.
    pub fn nat_rules(&self) -> &BTreeMap<Name, NatRule> {
        &self.nat
    }

    /// Meters by name.
    pub fn meters(&self) -> &BTreeMap<Name, Meter> {
        &self.meters
    }

    /// The VPC owning a table.
    pub fn vpc_by_table(&self, table: TableId) -> Option<&Vpc> {
        self.vpcs.values().find(|v| v.table == table)
    }

    /// The VPC with an L3 VNI.
    pub fn vpc_by_vni(&self, vni: Vni) -> Option<&Vpc> {
        self.vpcs.values().find(|v| v.vni == vni)
    }

    /// The VPC a port belongs to.
    pub fn vpc_by_port(&self, port: PortId) -> Option<&Vpc> {
        self.vpcs.values().find(|v| v.ports.contains(&port))
    }

    /// The meter attached to a target.
    pub fn meter_for(&self, target: &MeterTarget) -> Option<&Meter> {
        self.meters.values().find(|m| &m.target == target)
    }

    /// Whether a table exists (the underlay always does).
    pub fn has_table(&self, table: TableId) -> bool {
        table == UNDERLAY_TABLE || self.vpc_by_table(table).is_some()
    }

    /// Longest-prefix match over the model's routes (reference speed: used by the compiler to
    /// resolve VTEPs, never per packet).
    pub fn lookup(&self, table: TableId, ip: IpAddr) -> Option<&Route> {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        (0..=max).rev().find_map(|len| {
            let prefix = Prefix::new(ip, 128).or_else(|_| Prefix::new(ip, 32)).ok()?;
            let key = RouteKey {
                table,
                prefix: prefix.truncate(len),
            };
            self.routes.get(&key)
        })
    }

    /// Applies a batch atomically: either every change is applied, or none is and the error
    /// names the failing change and field.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), ModelError> {
        let mut undo = Vec::with_capacity(changes.len());
        for (index, change) in changes.iter().enumerate() {
            match self.apply_one(change) {
                Ok(u) => undo.push(u),
                Err(e) => {
                    for u in undo.into_iter().rev() {
                        self.revert(u);
                    }
                    return Err(ModelError::InBatch {
                        index,
                        source: Box::new(e),
                    });
                }
            }
        }
        Ok(())
    }

    fn revert(&mut self, u: Undo) {
        match u {
            Undo::Node(n) => self.node = n,
            Undo::Vpc(k, v) => restore(&mut self.vpcs, k, v),
            Undo::Route(k, v) => restore(&mut self.routes, k, v),
            Undo::Nat(k, v) => restore(&mut self.nat, k, v),
            Undo::Meter(k, v) => restore(&mut self.meters, k, v),
        }
    }

    fn apply_one(&mut self, change: &Change) -> Result<Undo, ModelError> {
        Ok(match change {
            Change::SetNode(n) => {
                self.check_node(n)?;
                Undo::Node(self.node.replace(n.clone()))
            }
            Change::UpsertVpc(v) => {
                self.check_vpc(v)?;
                Undo::Vpc(v.name.clone(), self.vpcs.insert(v.name.clone(), v.clone()))
            }
            Change::DeleteVpc(name) => {
                let object = ObjectKey::Vpc(name.clone());
                let vpc = self.vpcs.get(name).ok_or(ModelError::NotFound {
                    object: object.clone(),
                })?;
                if let Some(by) = self.users_of_vpc(vpc) {
                    return Err(ModelError::InUse { object, by });
                }
                Undo::Vpc(name.clone(), self.vpcs.remove(name))
            }
            Change::UpsertRoute(r) => {
                self.check_route(r)?;
                Undo::Route(r.key, self.routes.insert(r.key, r.clone()))
            }
            Change::DeleteRoute(k) => {
                let object = ObjectKey::Route(*k);
                if !self.routes.contains_key(k) {
                    return Err(ModelError::NotFound { object });
                }
                if let Some(m) = self.meter_for(&MeterTarget::Route(*k)) {
                    return Err(ModelError::InUse {
                        object,
                        by: ObjectKey::Meter(m.name.clone()),
                    });
                }
                Undo::Route(*k, self.routes.remove(k))
            }
            Change::UpsertNat(n) => {
                self.check_nat(n)?;
                Undo::Nat(n.name.clone(), self.nat.insert(n.name.clone(), n.clone()))
            }
            Change::DeleteNat(name) => {
                if !self.nat.contains_key(name) {
                    return Err(ModelError::NotFound {
                        object: ObjectKey::Nat(name.clone()),
                    });
                }
                Undo::Nat(name.clone(), self.nat.remove(name))
            }
            Change::UpsertMeter(m) => {
                self.check_meter(m)?;
                Undo::Meter(
                    m.name.clone(),
                    self.meters.insert(m.name.clone(), m.clone()),
                )
            }
            Change::DeleteMeter(name) => {
                if !self.meters.contains_key(name) {
                    return Err(ModelError::NotFound {
                        object: ObjectKey::Meter(name.clone()),
                    });
                }
                Undo::Meter(name.clone(), self.meters.remove(name))
            }
        })
    }

    fn users_of_vpc(&self, vpc: &Vpc) -> Option<ObjectKey> {
        if let Some((k, _)) = self.routes.range(table_range(vpc.table)).next() {
            return Some(ObjectKey::Route(*k));
        }
        if let Some(n) = self.nat.values().find(|n| n.vpc == vpc.name) {
            return Some(ObjectKey::Nat(n.name.clone()));
        }
        if let Some(m) = self.meter_for(&MeterTarget::Vpc(vpc.name.clone())) {
            return Some(ObjectKey::Meter(m.name.clone()));
        }
        self.routes
            .values()
            .find(|r| {
                r.nexthops
                    .iter()
                    .any(|nh| matches!(nh, Nexthop::Vxlan { vni, .. } if *vni == vpc.vni))
            })
            .map(|r| ObjectKey::Route(r.key))
    }

    fn check_node(&self, n: &Node) -> Result<(), ModelError> {
        let o = || ObjectKey::Node;
        if n.vtep.is_unspecified() || n.vtep.is_multicast() || n.vtep.is_broadcast() {
            return Err(invalid(o(), "vtep", Problem::BadAddress));
        }
        if n.router_mac.is_multicast() || n.router_mac == MacAddr::default() {
            return Err(invalid(o(), "router_mac", Problem::BadAddress));
        }
        if let Some(p) = n.uplinks.iter().find(|p| self.vpc_by_port(**p).is_some()) {
            let other = self
                .vpc_by_port(*p)
                .map(|v| ObjectKey::Vpc(v.name.clone()))
                .unwrap_or(ObjectKey::Node);
            return Err(invalid(
                o(),
                "uplinks",
                Problem::PortInUse { port: p.0, other },
            ));
        }
        // Underlay routes must keep pointing at uplinks.
        for r in self
            .routes
            .range(table_range(UNDERLAY_TABLE))
            .map(|(_, r)| r)
        {
            for nh in &r.nexthops {
                if let Nexthop::Underlay { port, .. } = nh {
                    if !n.uplinks.contains(port) {
                        return Err(ModelError::InUse {
                            object: ObjectKey::Node,
                            by: ObjectKey::Route(r.key),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn check_vpc(&self, v: &Vpc) -> Result<(), ModelError> {
        let o = || ObjectKey::Vpc(v.name.clone());
        if let Some(other) = self.vpc_by_vni(v.vni).filter(|x| x.name != v.name) {
            return Err(invalid(
                o(),
                "vni",
                Problem::DuplicateVni {
                    other: other.name.clone(),
                },
            ));
        }
        if matches!(v.table.0, 253..=255) {
            return Err(invalid(o(), "table", Problem::ReservedTable(v.table.0)));
        }
        if v.table.0 == 0 || v.table.0 > TableId::MAX {
            return Err(invalid(
                o(),
                "table",
                Problem::OutOfRange {
                    min: 1,
                    max: u64::from(TableId::MAX),
                },
            ));
        }
        if let Some(other) = self.vpc_by_table(v.table).filter(|x| x.name != v.name) {
            return Err(invalid(
                o(),
                "table",
                Problem::DuplicateTable {
                    other: ObjectKey::Vpc(other.name.clone()),
                },
            ));
        }
        for p in &v.ports {
            let other = match self.vpc_by_port(*p) {
                Some(x) if x.name != v.name => Some(ObjectKey::Vpc(x.name.clone())),
                _ if self.node.as_ref().is_some_and(|n| n.uplinks.contains(p)) => {
                    Some(ObjectKey::Node)
                }
                _ => None,
            };
            if let Some(other) = other {
                return Err(invalid(
                    o(),
                    "ports",
                    Problem::PortInUse { port: p.0, other },
                ));
            }
        }
        if let Some(old) = self.vpcs.get(&v.name) {
            // Moving a VPC to another table or VNI would orphan what refers to the old ones.
            if old.table != v.table || old.vni != v.vni {
                if let Some(by) = self.users_of_vpc(old) {
                    return Err(ModelError::InUse { object: o(), by });
                }
            }
        }
        Ok(())
    }

    fn check_route(&self, r: &Route) -> Result<(), ModelError> {
        let o = || ObjectKey::Route(r.key);
        let table = r.key.table;
        if !self.has_table(table) {
            return Err(invalid(
                o(),
                "table",
                Problem::Unknown(ObjectKeyOrTable::Table(table)),
            ));
        }
        if r.nexthops.is_empty() || r.nexthops.len() > MAX_ECMP {
            return Err(invalid(
                o(),
                "nexthops",
                Problem::Count {
                    min: 1,
                    max: MAX_ECMP,
                },
            ));
        }
        let kind = |nh: &Nexthop| core::mem::discriminant(nh);
        let first = &r.nexthops[0];
        let alone = matches!(first, Nexthop::Vrf { .. } | Nexthop::Blackhole);
        if r.nexthops.iter().any(|nh| kind(nh) != kind(first)) || (alone && r.nexthops.len() > 1) {
            return Err(invalid(o(), "nexthops", Problem::MixedNexthops));
        }
        let mut seen = BTreeMap::new();
        for (i, nh) in r.nexthops.iter().enumerate() {
            let field = |f: &str| format!("nexthops[{i}].{f}");
            if let Some(first) = seen.insert(nh, i) {
                return Err(invalid(
                    o(),
                    format!("nexthops[{i}]"),
                    Problem::DuplicateNexthop { index: first },
                ));
            }
            match *nh {
                Nexthop::Underlay { gateway, port, mac } => {
                    if gateway.is_unspecified() || gateway.is_multicast() {
                        return Err(invalid(o(), field("gateway"), Problem::BadAddress));
                    }
                    if r.key.prefix.addr().is_ipv6() && gateway.is_ipv4() {
                        return Err(invalid(o(), field("gateway"), Problem::WrongFamily));
                    }
                    if mac.is_multicast() || mac == MacAddr::default() {
                        return Err(invalid(o(), field("mac"), Problem::BadAddress));
                    }
                    // Underlay nexthops leave through uplinks; in a VPC they leave through one of
                    // the VPC's own ports.
                    let ok = if table == UNDERLAY_TABLE {
                        self.node
                            .as_ref()
                            .is_some_and(|n| n.uplinks.contains(&port))
                    } else {
                        self.vpc_by_table(table)
                            .is_some_and(|v| v.ports.contains(&port))
                    };
                    if !ok {
                        let uplink = self
                            .node
                            .as_ref()
                            .is_some_and(|n| n.uplinks.contains(&port));
                        let problem = if table != UNDERLAY_TABLE && uplink {
                            Problem::UplinkInVpc(port.0)
                        } else {
                            Problem::Unknown(ObjectKeyOrTable::Uplink(port))
                        };
                        return Err(invalid(o(), field("port"), problem));
                    }
                }
                Nexthop::Vxlan {
                    vni,
                    remote_vtep,
                    router_mac,
                } => {
                    let Some(owner) = self.vpc_by_vni(vni) else {
                        return Err(invalid(
                            o(),
                            field("vni"),
                            Problem::Unknown(ObjectKeyOrTable::Vni(vni.get())),
                        ));
                    };
                    // A VPC's routes may only encapsulate into its own VNI: another VPC's
                    // would deliver this tenant's packets into that tenant's network.
                    if let Some(vpc) = self.vpc_by_table(table) {
                        if vpc.name != owner.name {
                            return Err(invalid(
                                o(),
                                field("vni"),
                                Problem::ForeignVni {
                                    vni: vni.get(),
                                    owner: owner.name.clone(),
                                    vpc: vpc.name.clone(),
                                },
                            ));
                        }
                    }
                    if self.node.as_ref().is_some_and(|n| n.vtep == remote_vtep) {
                        return Err(invalid(o(), field("remote_vtep"), Problem::OwnVtep));
                    }
                    if remote_vtep.is_unspecified()
                        || remote_vtep.is_multicast()
                        || remote_vtep.is_broadcast()
                    {
                        return Err(invalid(o(), field("remote_vtep"), Problem::BadAddress));
                    }
                    if router_mac.is_multicast() || router_mac == MacAddr::default() {
                        return Err(invalid(o(), field("router_mac"), Problem::BadAddress));
                    }
                }
                Nexthop::Vrf { table: target } => {
                    if table == UNDERLAY_TABLE {
                        return Err(invalid(o(), field("table"), Problem::VrfInUnderlay));
                    }
                    if target != UNDERLAY_TABLE {
                        return Err(invalid(
                            o(),
                            field("table"),
                            Problem::Unknown(ObjectKeyOrTable::Table(target)),
                        ));
                    }
                }
                Nexthop::Blackhole => {}
            }
        }
        // A route may not shadow a NAT64 prefix exactly: the prefix is the NAT64 "route".
        if let Some(vpc) = self.vpc_by_table(table) {
            if let Some(n) = self.nat.values().find(|n| {
                n.vpc == vpc.name
                    && matches!(n.kind, NatKind::Nat64 { prefix, .. } if prefix == r.key.prefix)
            }) {
                return Err(invalid(
                    o(),
                    "prefix",
                    Problem::Duplicate {
                        other: ObjectKey::Nat(n.name.clone()),
                    },
                ));
            }
        }
        Ok(())
    }

    fn check_nat(&self, n: &NatRule) -> Result<(), ModelError> {
        let o = || ObjectKey::Nat(n.name.clone());
        let Some(vpc) = self.vpcs.get(&n.vpc) else {
            return Err(invalid(
                o(),
                "vpc",
                Problem::Unknown(ObjectKeyOrTable::Object(ObjectKey::Vpc(n.vpc.clone()))),
            ));
        };
        let others = || self.nat.values().filter(|x| x.name != n.name);
        let v4_usable = |a: Ipv4Addr| !(a.is_unspecified() || a.is_multicast() || a.is_broadcast());
        let check_pool = |pool: Ipv4Range, ports: (u16, u16)| -> Result<(), ModelError> {
            if pool.first > pool.last {
                return Err(invalid(
                    o(),
                    "pool",
                    Problem::Reversed {
                        first: pool.first.to_string(),
                        last: pool.last.to_string(),
                    },
                ));
            }
            if !v4_usable(pool.first) || !v4_usable(pool.last) {
                return Err(invalid(o(), "pool", Problem::BadAddress));
            }
            if pool.size() > u64::from(Ipv4Range::MAX_ADDRESSES) {
                return Err(invalid(
                    o(),
                    "pool",
                    Problem::TooLarge {
                        max: u64::from(Ipv4Range::MAX_ADDRESSES),
                    },
                ));
            }
            if ports.0 > ports.1 {
                return Err(invalid(
                    o(),
                    "ports",
                    Problem::Reversed {
                        first: ports.0.to_string(),
                        last: ports.1.to_string(),
                    },
                ));
            }
            if ports.0 == 0 {
                return Err(invalid(
                    o(),
                    "ports",
                    Problem::OutOfRange { min: 1, max: 65535 },
                ));
            }
            Ok(())
        };
        match &n.kind {
            NatKind::Static44 { inside, outside } => {
                if !v4_usable(*inside) {
                    return Err(invalid(o(), "inside", Problem::BadAddress));
                }
                if !v4_usable(*outside) {
                    return Err(invalid(o(), "outside", Problem::BadAddress));
                }
                if let Some(x) = others().find(|x| {
                    x.vpc == n.vpc
                        && matches!(x.kind, NatKind::Static44 { inside: i, .. } if i == *inside)
                }) {
                    return Err(invalid(
                        o(),
                        "inside",
                        Problem::Duplicate {
                            other: ObjectKey::Nat(x.name.clone()),
                        },
                    ));
                }
            }
            NatKind::Static66 { inside, outside } => {
                if inside.is_unspecified() || inside.is_multicast() {
                    return Err(invalid(o(), "inside", Problem::BadAddress));
                }
                if outside.is_unspecified() || outside.is_multicast() {
                    return Err(invalid(o(), "outside", Problem::BadAddress));
                }
                for x in others() {
                    if let NatKind::Static66 {
                        inside: i,
                        outside: out,
                    } = x.kind
                    {
                        let dup_in = x.vpc == n.vpc && i == *inside;
                        if dup_in || out == *outside {
                            return Err(invalid(
                                o(),
                                if dup_in { "inside" } else { "outside" },
                                Problem::Overlaps {
                                    other: ObjectKey::Nat(x.name.clone()),
                                },
                            ));
                        }
                    }
                }
            }
            NatKind::Napt44 { pool, ports } => {
                check_pool(*pool, *ports)?;
                if let Some(x) =
                    others().find(|x| x.vpc == n.vpc && matches!(x.kind, NatKind::Napt44 { .. }))
                {
                    return Err(invalid(
                        o(),
                        "vpc",
                        Problem::Duplicate {
                            other: ObjectKey::Nat(x.name.clone()),
                        },
                    ));
                }
            }
            NatKind::Nat64 {
                prefix,
                pool,
                ports,
            } => {
                check_pool(*pool, *ports)?;
                if prefix.is_v4() || ![32, 40, 48, 56, 64, 96].contains(&prefix.len()) {
                    return Err(invalid(o(), "prefix", Problem::Nat64PrefixLength));
                }
                if let IpAddr::V6(a) = prefix.addr() {
                    // Shorter prefixes have these bits as host bits, refused already.
                    if a.octets()[8] != 0 {
                        return Err(invalid(o(), "prefix", Problem::Nat64UOctet));
                    }
                }
                if let Some(x) =
                    others().find(|x| x.vpc == n.vpc && matches!(x.kind, NatKind::Nat64 { .. }))
                {
                    return Err(invalid(
                        o(),
                        "vpc",
                        Problem::Duplicate {
                            other: ObjectKey::Nat(x.name.clone()),
                        },
                    ));
                }
                let key = RouteKey {
                    table: vpc.table,
                    prefix: *prefix,
                };
                if self.routes.contains_key(&key) {
                    return Err(invalid(
                        o(),
                        "prefix",
                        Problem::Duplicate {
                            other: ObjectKey::Route(key),
                        },
                    ));
                }
            }
        }
        if let Some(mine) = n.kind.outside_v4() {
            if let Some(x) =
                others().find(|x| x.kind.outside_v4().is_some_and(|r| r.overlaps(&mine)))
            {
                let field = match n.kind {
                    NatKind::Static44 { .. } => "outside",
                    _ => "pool",
                };
                return Err(invalid(
                    o(),
                    field,
                    Problem::Overlaps {
                        other: ObjectKey::Nat(x.name.clone()),
                    },
                ));
            }
            if self
                .node
                .as_ref()
                .is_some_and(|node| mine.contains(node.vtep))
            {
                return Err(invalid(
                    o(),
                    "pool",
                    Problem::Overlaps {
                        other: ObjectKey::Node,
                    },
                ));
            }
        }
        Ok(())
    }

    fn check_meter(&self, m: &Meter) -> Result<(), ModelError> {
        let o = || ObjectKey::Meter(m.name.clone());
        m.profile
            .validate()
            .map_err(|(field, p)| invalid(o(), format!("profile.{field}"), p))?;
        let known = match &m.target {
            MeterTarget::Vpc(name) => self.vpcs.contains_key(name),
            MeterTarget::Route(k) => self.routes.contains_key(k),
        };
        if !known {
            let what = match &m.target {
                MeterTarget::Vpc(name) => ObjectKey::Vpc(name.clone()),
                MeterTarget::Route(k) => ObjectKey::Route(*k),
            };
            return Err(invalid(
                o(),
                "target",
                Problem::Unknown(ObjectKeyOrTable::Object(what)),
            ));
        }
        if let Some(x) = self.meter_for(&m.target).filter(|x| x.name != m.name) {
            return Err(invalid(
                o(),
                "target",
                Problem::Duplicate {
                    other: ObjectKey::Meter(x.name.clone()),
                },
            ));
        }
        Ok(())
    }
}

fn restore<K: Ord, V>(map: &mut BTreeMap<K, V>, k: K, v: Option<V>) {
    match v {
        Some(v) => {
            map.insert(k, v);
        }
        None => {
            map.remove(&k);
        }
    }
}

/// All route keys of one table, for `BTreeMap::range`.
pub fn table_range(table: TableId) -> core::ops::RangeInclusive<RouteKey> {
    let lo = RouteKey {
        table,
        prefix: Prefix {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            len: 0,
        },
    };
    let hi = RouteKey {
        table,
        prefix: Prefix {
            addr: IpAddr::V6(Ipv6Addr::from(u128::MAX)),
            len: 128,
        },
    };
    lo..=hi
}
