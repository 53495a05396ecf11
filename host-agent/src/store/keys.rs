//! The etcd key layout. Everything lives under [`PREFIX`]; values are JSON.
//!
//! ```text
//! /dpucp/v1/node                          Node
//! /dpucp/v1/vpcs/NAME                     Vpc
//! /dpucp/v1/routes/TABLE/ADDR_LEN         Route   (the prefix's '/' written as '_')
//! /dpucp/v1/nat/NAME                      NatRule
//! /dpucp/v1/meters/NAME                   Meter
//! /dpucp/v1/meta/generation               bumped by every desired-state write (see Store::write)
//! /dpucp/v1/status/DPU/<object suffix>    OffloadStatus of one object on one DPU
//! /dpucp/v1/dpus/ID                       DpuRecord (persistent)
//! /dpucp/v1/alive/ID                      liveness, bound to the DPU's lease
//! /dpucp/v1/pairs/GROUP/leader            the active member of an A/B pair, bound to its lease
//! ```

use core::net::IpAddr;

use flow_offload::model::{Name, ObjectKey, Prefix, RouteKey, TableId};

/// The root of every key.
pub const PREFIX: &str = "/dpucp/v1/";
/// Bumped by every desired-state write: the compare on it serialises writers whose validation
/// read other objects (a route and the deletion of its VPC cannot both succeed).
pub const GENERATION: &str = "/dpucp/v1/meta/generation";
/// The prefix of status keys.
pub const STATUS: &str = "/dpucp/v1/status/";
/// The prefix of DPU records.
pub const DPUS: &str = "/dpucp/v1/dpus/";
/// The prefix of DPU liveness keys.
pub const ALIVE: &str = "/dpucp/v1/alive/";

/// The leader key of an A/B pair.
pub fn pair_leader_key(group: &Name) -> String {
    format!("{PREFIX}pairs/{group}/leader")
}

/// Desired-state prefixes, in dependency order (node, VPCs, routes, NAT, meters).
pub const DESIRED: [&str; 5] = [
    "/dpucp/v1/node",
    "/dpucp/v1/vpcs/",
    "/dpucp/v1/routes/",
    "/dpucp/v1/nat/",
    "/dpucp/v1/meters/",
];

/// The key of an object, relative to [`PREFIX`] (also used under a DPU's status prefix).
pub fn object_suffix(k: &ObjectKey) -> String {
    match k {
        ObjectKey::Node => "node".to_owned(),
        ObjectKey::Vpc(n) => format!("vpcs/{n}"),
        ObjectKey::Route(r) => format!(
            "routes/{}/{}_{}",
            r.table.0,
            r.prefix.addr(),
            r.prefix.len()
        ),
        ObjectKey::Nat(n) => format!("nat/{n}"),
        ObjectKey::Meter(n) => format!("meters/{n}"),
    }
}

/// The full key of an object's desired state.
pub fn object_key(k: &ObjectKey) -> String {
    format!("{PREFIX}{}", object_suffix(k))
}

/// The object a key suffix names, if it names one.
pub fn parse_object_suffix(s: &str) -> Option<ObjectKey> {
    if s == "node" {
        return Some(ObjectKey::Node);
    }
    let (kind, rest) = s.split_once('/')?;
    let name = || Name::new(rest).ok();
    match kind {
        "vpcs" => name().map(ObjectKey::Vpc),
        "nat" => name().map(ObjectKey::Nat),
        "meters" => name().map(ObjectKey::Meter),
        "routes" => {
            let (table, prefix) = rest.split_once('/')?;
            let table: u32 = table.parse().ok()?;
            let (addr, len) = prefix.rsplit_once('_')?;
            let addr: IpAddr = addr.parse().ok()?;
            let len: u8 = len.parse().ok()?;
            Some(ObjectKey::Route(RouteKey {
                table: TableId(table),
                prefix: Prefix::new(addr, len).ok()?,
            }))
        }
        _ => None,
    }
}

/// The object a full desired-state key names.
pub fn parse_object_key(key: &str) -> Option<ObjectKey> {
    parse_object_suffix(key.strip_prefix(PREFIX)?)
}

/// The key of one object's status on one DPU.
pub fn status_key(dpu: &Name, k: &ObjectKey) -> String {
    format!("{STATUS}{dpu}/{}", object_suffix(k))
}

/// The DPU and object a status key names.
pub fn parse_status_key(key: &str) -> Option<(Name, ObjectKey)> {
    let (dpu, suffix) = key.strip_prefix(STATUS)?.split_once('/')?;
    Some((Name::new(dpu).ok()?, parse_object_suffix(suffix)?))
}

/// The key of a DPU's record.
pub fn dpu_key(id: &Name) -> String {
    format!("{DPUS}{id}")
}

/// The key of a DPU's liveness (bound to its lease).
pub fn alive_key(id: &Name) -> String {
    format!("{ALIVE}{id}")
}

/// Dependency rank of an object kind: upserts go in this order, deletes in reverse.
pub fn rank(k: &ObjectKey) -> u8 {
    match k {
        ObjectKey::Node => 0,
        ObjectKey::Vpc(_) => 1,
        ObjectKey::Route(_) => 2,
        ObjectKey::Nat(_) => 3,
        ObjectKey::Meter(_) => 4,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn keys_roundtrip() {
        let keys = [
            ObjectKey::Node,
            ObjectKey::Vpc(Name::new("blue").unwrap()),
            ObjectKey::Route(RouteKey {
                table: TableId(100),
                prefix: "10.1.0.0/16".parse().unwrap(),
            }),
            ObjectKey::Route(RouteKey {
                table: TableId(254),
                prefix: "2001:db8::/32".parse().unwrap(),
            }),
            ObjectKey::Nat(Name::new("n1").unwrap()),
            ObjectKey::Meter(Name::new("m.1").unwrap()),
        ];
        for k in keys {
            let s = object_key(&k);
            assert_eq!(parse_object_key(&s), Some(k.clone()), "{s}");
            let d = Name::new("dpu0").unwrap();
            assert_eq!(parse_status_key(&status_key(&d, &k)), Some((d, k)));
        }
        assert_eq!(
            object_key(&ObjectKey::Route(RouteKey {
                table: TableId(100),
                prefix: "10.1.0.0/16".parse().unwrap(),
            })),
            "/dpucp/v1/routes/100/10.1.0.0_16"
        );
    }

    #[test]
    fn foreign_keys_are_not_objects() {
        assert_eq!(parse_object_key("/dpucp/v1/meta/generation"), None);
        assert_eq!(parse_object_key("/dpucp/v1/vpcs/Bad Name"), None);
        assert_eq!(parse_object_key("/dpucp/v1/routes/100/10.1.0.1_16"), None);
        assert_eq!(parse_object_key("/other/vpcs/x"), None);
    }
}
