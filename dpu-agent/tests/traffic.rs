//! Real packets through the real agent: DPDK `net_tap` ports whose kernel interfaces are moved
//! into namespaces acting as two VPC hosts (A, B) and an underlay peer (U), each with the
//! kernel's own stack (it checks checksums). The host link is driven from the test.
//!
//! ```text
//!   ns A 10.1.0.2/24 fd00:1::2/64 ─┐                 ┌─ ns U 192.0.2.2/24, lo 198.51.100.1
//!                                  ├─ dpu-agent ─────┤   (server; vxlan vni 100 at 10.9.0.1)
//!   ns B 10.2.0.2/24 ─────────────┘   VTEP 192.0.2.1 └─ routes 203.0.113.0/24 back to the DPU
//! ```
//! Needs root; run by `scripts/test`. Each test starts its own agent and namespaces and stops
//! them (SIGTERM, then the exit status is checked: a graceful shutdown exits 0).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use common::{can_run, netprobe, python, tag, AgentProc, HostLink, Netns, TapPort};
use flow_offload::caps::Refusal;
use flow_offload::compile::SwReason;
use flow_offload::model::{
    Change, Ipv4Range, MacAddr, Meter, MeterProfile, MeterTarget, Name, NatKind, NatRule, Nexthop,
    Node, ObjectKey, PortId, Prefix, Route, RouteKey, TableId, Vni, Vpc, UNDERLAY_TABLE,
};
use flow_offload::status::OffloadStatus;
use flow_offload::wire::Message;

const ROUTER_MAC: MacAddr = MacAddr([0x02, 0xdc, 0, 0, 0, 0x01]);
const VXLAN_PEER_MAC: MacAddr = MacAddr([0x02, 0xdc, 0, 0, 0, 0x99]);
const BLUE: TableId = TableId(10);

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn pfx(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn mac_str(m: MacAddr) -> String {
    m.0.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn route(table: TableId, prefix: &str, nh: Nexthop) -> Change {
    Change::UpsertRoute(Route {
        key: RouteKey {
            table,
            prefix: pfx(prefix),
        },
        nexthops: vec![nh],
    })
}

struct Lab {
    agent: AgentProc,
    link: HostLink,
    a: Netns,
    b: Netns,
    u: Netns,
    ports: [PortId; 3],
    macs: [MacAddr; 3],
    ifaces: [String; 3],
    py: String,
    probe: String,
}

impl Lab {
    /// Starts the agent and builds the namespaces; no model yet.
    fn new(test: &str) -> Lab {
        let t = tag(test);
        let ifaces = [format!("a{t}"), format!("b{t}"), format!("u{t}")];
        let ports = [
            TapPort {
                iface: ifaces[0].clone(),
                role: "vpc",
            },
            TapPort {
                iface: ifaces[1].clone(),
                role: "vpc",
            },
            TapPort {
                iface: ifaces[2].clone(),
                role: "uplink",
            },
        ];
        let agent = AgentProc::start(&t, &ports);
        let link = HostLink::connect(agent.link);
        assert_eq!(link.hello.last_epoch, None, "a fresh agent starts empty");
        assert_eq!(link.hello.ports.len(), 3);
        let ids = [
            link.hello.ports[0].0,
            link.hello.ports[1].0,
            link.hello.ports[2].0,
        ];
        let a = Netns::new(&format!("nsa{t}"));
        let b = Netns::new(&format!("nsb{t}"));
        let u = Netns::new(&format!("nsu{t}"));
        a.take(&ifaces[0]);
        b.take(&ifaces[1]);
        u.take(&ifaces[2]);
        let r = mac_str(ROUTER_MAC);
        let (ia, ib, iu) = (&ifaces[0], &ifaces[1], &ifaces[2]);
        a.ip(&["addr", "add", "10.1.0.2/24", "dev", ia]);
        a.ip(&["addr", "add", "fd00:1::2/64", "dev", ia, "nodad"]);
        a.ip(&[
            "neigh",
            "add",
            "10.1.0.1",
            "lladdr",
            &r,
            "dev",
            ia,
            "nud",
            "permanent",
        ]);
        a.ip(&[
            "neigh",
            "add",
            "fd00:1::1",
            "lladdr",
            &r,
            "dev",
            ia,
            "nud",
            "permanent",
        ]);
        a.ip(&["route", "add", "default", "via", "10.1.0.1"]);
        a.ip(&["-6", "route", "add", "default", "via", "fd00:1::1"]);
        b.ip(&["addr", "add", "10.2.0.2/24", "dev", ib]);
        b.ip(&[
            "neigh",
            "add",
            "10.2.0.1",
            "lladdr",
            &r,
            "dev",
            ib,
            "nud",
            "permanent",
        ]);
        b.ip(&["route", "add", "default", "via", "10.2.0.1"]);
        u.ip(&["addr", "add", "192.0.2.2/24", "dev", iu]);
        u.ip(&["addr", "add", "198.51.100.1/32", "dev", "lo"]);
        u.ip(&[
            "neigh",
            "add",
            "192.0.2.1",
            "lladdr",
            &r,
            "dev",
            iu,
            "nud",
            "permanent",
        ]);
        u.ip(&["route", "add", "203.0.113.0/24", "via", "192.0.2.1"]);
        let macs = [a.mac(ia), b.mac(ib), u.mac(iu)];
        Lab {
            agent,
            link,
            a,
            b,
            u,
            ports: ids,
            macs,
            ifaces,
            py: python(),
            probe: netprobe(),
        }
    }

    /// The base model: node, VPC blue on A and B, host routes, the underlay toward U.
    fn base(&self) -> Vec<Change> {
        let [pa, pb, pu] = self.ports;
        let [ma, mb, mu] = self.macs;
        let under = |gw: [u8; 4]| Nexthop::Underlay {
            gateway: IpAddr::V4(Ipv4Addr::from(gw)),
            port: pu,
            mac: mu,
        };
        vec![
            Change::SetNode(Node {
                vtep: Ipv4Addr::new(192, 0, 2, 1),
                router_mac: ROUTER_MAC,
                uplinks: [pu].into_iter().collect(),
            }),
            Change::UpsertVpc(Vpc {
                name: name("blue"),
                vni: Vni::new(100).unwrap(),
                table: BLUE,
                ports: [pa, pb].into_iter().collect(),
            }),
            route(UNDERLAY_TABLE, "192.0.2.0/24", under([192, 0, 2, 2])),
            route(UNDERLAY_TABLE, "198.51.100.0/24", under([192, 0, 2, 2])),
            route(
                BLUE,
                "10.1.0.0/24",
                Nexthop::Underlay {
                    gateway: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2)),
                    port: pa,
                    mac: ma,
                },
            ),
            route(
                BLUE,
                "fd00:1::/64",
                Nexthop::Underlay {
                    gateway: IpAddr::V6("fd00:1::2".parse::<Ipv6Addr>().unwrap()),
                    port: pa,
                    mac: ma,
                },
            ),
            route(BLUE, "10.2.0.0/16", Nexthop::Blackhole),
            route(
                BLUE,
                "10.2.0.0/24",
                Nexthop::Underlay {
                    gateway: IpAddr::V4(Ipv4Addr::new(10, 2, 0, 2)),
                    port: pb,
                    mac: mb,
                },
            ),
        ]
    }

    fn apply(&mut self, epoch: u64, changes: Vec<Change>) -> Vec<(ObjectKey, OffloadStatus)> {
        match self.link.apply(epoch, false, changes) {
            Message::Ack(a) => a.status,
            other => panic!(
                "batch {epoch} not acknowledged: {other:?}\n{}",
                self.agent.log()
            ),
        }
    }

    /// Starts a server mode of netprobe in a namespace.
    fn serve(&self, ns: &Netns, args: &[&str]) -> std::process::Child {
        let mut v = vec![self.py.as_str(), self.probe.as_str()];
        v.extend_from_slice(args);
        ns.spawn(&v)
    }

    /// Runs a client mode of netprobe and returns its output line.
    fn ask(&self, ns: &Netns, args: &[&str]) -> String {
        let mut v = vec![self.py.as_str(), self.probe.as_str()];
        v.extend_from_slice(args);
        let out = ns.exec(&v);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Stops the agent and checks the graceful exit.
    fn finish(mut self) {
        let st = self.agent.stop();
        let log = self.agent.log();
        assert!(st.success(), "agent exit {st}:\n{log}");
        assert!(log.contains("flows destroyed"), "{log}");
    }
}

fn finish_server(c: std::process::Child) -> String {
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn routed_forwarding_by_longest_prefix() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("routed");
    let base = lab.base();
    let status = lab.apply(1, base);
    // net_tap validates eth/ipv4 -> drop, but creating it fails in this kernel: the blackhole
    // route runs in software with the driver's create error as the reason.
    let blackhole = ObjectKey::Route(RouteKey {
        table: BLUE,
        prefix: pfx("10.2.0.0/16"),
    });
    let st = status
        .iter()
        .find(|(k, _)| *k == blackhole)
        .map(|(_, s)| s.clone());
    match st {
        Some(OffloadStatus::Software {
            reason: SwReason::Unsupported(Refusal::Driver { errno, .. }),
        }) => assert_eq!(errno, "EEXIST"),
        other => panic!("blackhole status {other:?}"),
    }
    // A host route needs MAC rewrites, which net_tap refuses by name at probe time.
    let host = ObjectKey::Route(RouteKey {
        table: BLUE,
        prefix: pfx("10.2.0.0/24"),
    });
    assert!(
        status.iter().any(|(k, s)| *k == host
            && matches!(
                s,
                OffloadStatus::Software {
                    reason: SwReason::Unsupported(Refusal::Action { .. })
                }
            )),
        "{status:?}"
    );

    // A -> B: the /24 inside the blackholed /16 wins; both ways, UDP and TCP.
    let udp = lab.serve(&lab.b, &["udp-echo", "10.2.0.2", "7000", "6"]);
    let tcp = lab.serve(&lab.b, &["tcp-echo", "10.2.0.2", "7001", "6"]);
    std::thread::sleep(Duration::from_millis(300));
    let r = lab.ask(&lab.a, &["udp-ask", "10.2.0.2", "7000", "hello-udp", "4"]);
    assert!(
        r.starts_with("10.1.0.2:") && r.ends_with("|hello-udp"),
        "{r}\n{}",
        lab.agent.log()
    );
    let r = lab.ask(&lab.a, &["tcp-ask", "10.2.0.2", "7001", "hello-tcp", "4"]);
    assert!(
        r.starts_with("10.1.0.2:") && r.ends_with("|hello-tcp"),
        "{r}"
    );
    // 10.2.1.2 only matches the blackhole.
    let r = lab.ask(&lab.a, &["udp-ask", "10.2.1.2", "7000", "void", "1"]);
    assert_eq!(r, "TIMEOUT");
    let _ = finish_server(udp);
    let _ = finish_server(tcp);

    // Remove the /24: now the /16 blackhole takes 10.2.0.2 as well.
    let st = lab.apply(
        2,
        vec![Change::DeleteRoute(RouteKey {
            table: BLUE,
            prefix: pfx("10.2.0.0/24"),
        })],
    );
    assert!(
        st.iter().all(|(k, _)| *k != host),
        "deleted route not reported: {st:?}"
    );
    let udp = lab.serve(&lab.b, &["udp-echo", "10.2.0.2", "7000", "3"]);
    std::thread::sleep(Duration::from_millis(300));
    let r = lab.ask(&lab.a, &["udp-ask", "10.2.0.2", "7000", "gone", "1.5"]);
    assert_eq!(r, "TIMEOUT");
    let _ = finish_server(udp);

    // The same epoch again is acknowledged, not re-applied.
    match lab.link.apply(2, false, vec![]) {
        Message::Ack(a) => assert_eq!(a.epoch, 2),
        other => panic!("{other:?}"),
    }
    lab.finish();
}

#[test]
fn nat44_napt_to_the_underlay() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("nat44");
    let mut changes = lab.base();
    changes.push(route(
        BLUE,
        "0.0.0.0/0",
        Nexthop::Vrf {
            table: UNDERLAY_TABLE,
        },
    ));
    changes.push(Change::UpsertNat(NatRule {
        name: name("blue-out"),
        vpc: name("blue"),
        kind: NatKind::Napt44 {
            pool: Ipv4Range {
                first: Ipv4Addr::new(203, 0, 113, 1),
                last: Ipv4Addr::new(203, 0, 113, 4),
            },
            ports: (20000, 29999),
        },
    }));
    let status = lab.apply(1, changes);
    assert!(
        status
            .iter()
            .any(|(k, s)| *k == ObjectKey::Nat(name("blue-out"))
                && *s
                    == OffloadStatus::Software {
                        reason: SwReason::NeedsState
                    }),
        "{status:?}"
    );
    let udp = lab.serve(&lab.u, &["udp-echo", "198.51.100.1", "8000", "6"]);
    let tcp = lab.serve(&lab.u, &["tcp-echo", "198.51.100.1", "8001", "6"]);
    std::thread::sleep(Duration::from_millis(300));
    for (proto, port) in [("udp-ask", "8000"), ("tcp-ask", "8001")] {
        let r = lab.ask(&lab.a, &[proto, "198.51.100.1", port, "out", "4"]);
        // The server saw a pool address and a pool port; the reply came back to A.
        let (peer, msg) = r
            .split_once('|')
            .unwrap_or_else(|| panic!("{proto}: {r}\n{}", lab.agent.log()));
        assert_eq!(msg, "out");
        let (ip, sport) = peer.split_once(':').unwrap();
        let ip: Ipv4Addr = ip.parse().unwrap();
        let sport: u16 = sport.parse().unwrap();
        assert!(
            (1..=4).contains(&ip.octets()[3]) && ip.octets()[..3] == [203, 0, 113],
            "{proto}: {peer}"
        );
        assert!((20000..=29999).contains(&sport), "{proto}: {peer}");
    }
    let _ = finish_server(udp);
    let _ = finish_server(tcp);
    lab.finish();
}

#[test]
fn nat64_ipv6_host_reaches_ipv4_server() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("nat64");
    let mut changes = lab.base();
    changes.push(Change::UpsertNat(NatRule {
        name: name("blue-64"),
        vpc: name("blue"),
        kind: NatKind::Nat64 {
            prefix: pfx("64:ff9b::/96"),
            pool: Ipv4Range {
                first: Ipv4Addr::new(203, 0, 113, 64),
                last: Ipv4Addr::new(203, 0, 113, 65),
            },
            ports: (30000, 39999),
        },
    }));
    lab.apply(1, changes);
    let udp = lab.serve(&lab.u, &["udp-echo", "198.51.100.1", "8100", "6"]);
    let tcp = lab.serve(&lab.u, &["tcp-echo", "198.51.100.1", "8101", "6"]);
    std::thread::sleep(Duration::from_millis(300));
    // 198.51.100.1 embedded in the well-known prefix.
    let dst = "64:ff9b::c633:6401";
    for (proto, port) in [("udp-ask", "8100"), ("tcp-ask", "8101")] {
        let r = lab.ask(&lab.a, &[proto, dst, port, "six-to-four", "4"]);
        let (peer, msg) = r
            .split_once('|')
            .unwrap_or_else(|| panic!("{proto}: {r}\n{}", lab.agent.log()));
        assert_eq!(msg, "six-to-four");
        let ip: Ipv4Addr = peer.split_once(':').unwrap().0.parse().unwrap();
        assert!(
            ip == Ipv4Addr::new(203, 0, 113, 64) || ip == Ipv4Addr::new(203, 0, 113, 65),
            "{proto}: {peer}"
        );
    }
    let _ = finish_server(udp);
    let _ = finish_server(tcp);
    lab.finish();
}

#[test]
fn vxlan_encap_to_a_linux_vxlan_device() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("vxlan");
    let iu = lab.ifaces[2].clone();
    // The peer VTEP: a Linux vxlan device with VNI 100 on 192.0.2.2, whose inner MAC is the
    // router MAC our routes name; it sends replies for the VPC back to our VTEP.
    let vx = format!("vx{}", &iu[1..]);
    lab.u.ip(&[
        "link",
        "add",
        &vx,
        "type",
        "vxlan",
        "id",
        "100",
        "local",
        "192.0.2.2",
        "dstport",
        "4789",
        "nolearning",
        "dev",
        &iu,
    ]);
    lab.u
        .ip(&["link", "set", &vx, "address", &mac_str(VXLAN_PEER_MAC)]);
    lab.u.ip(&["link", "set", &vx, "up"]);
    lab.u.ip(&["addr", "add", "10.9.0.1/24", "dev", &vx]);
    lab.u.exec(&[
        "bridge",
        "fdb",
        "append",
        "00:00:00:00:00:00",
        "dev",
        &vx,
        "dst",
        "192.0.2.1",
    ]);
    lab.u.ip(&[
        "route",
        "add",
        "10.1.0.0/24",
        "via",
        "10.9.0.254",
        "dev",
        &vx,
        "onlink",
    ]);
    lab.u.ip(&[
        "neigh",
        "add",
        "10.9.0.254",
        "lladdr",
        &mac_str(ROUTER_MAC),
        "dev",
        &vx,
        "nud",
        "permanent",
    ]);
    let mut changes = lab.base();
    changes.push(route(
        BLUE,
        "10.9.0.0/24",
        Nexthop::Vxlan {
            vni: Vni::new(100).unwrap(),
            remote_vtep: Ipv4Addr::new(192, 0, 2, 2),
            router_mac: VXLAN_PEER_MAC,
        },
    ));
    lab.apply(1, changes);
    let udp = lab.serve(&lab.u, &["udp-echo", "10.9.0.1", "8200", "6"]);
    let tcp = lab.serve(&lab.u, &["tcp-echo", "10.9.0.1", "8201", "6"]);
    std::thread::sleep(Duration::from_millis(300));
    // Out through our encap and Linux's decap, back through Linux's encap and our decap.
    for (proto, port) in [("udp-ask", "8200"), ("tcp-ask", "8201")] {
        let r = lab.ask(&lab.a, &[proto, "10.9.0.1", port, "overlay", "4"]);
        assert!(
            r.starts_with("10.1.0.2:") && r.ends_with("|overlay"),
            "{proto}: {r}\n{}",
            lab.agent.log()
        );
    }
    let _ = finish_server(udp);
    let _ = finish_server(tcp);
    lab.finish();
}

#[test]
fn meter_holds_a_udp_flood_to_its_rate() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("meter");
    let mut changes = lab.base();
    // 2 Mbit/s committed, small bursts: a flood from A is held to 250 kB/s of frames.
    let cir: u64 = 250_000;
    changes.push(Change::UpsertMeter(Meter {
        name: name("blue-limit"),
        profile: MeterProfile::SrTcm {
            cir,
            cbs: 3000,
            ebs: 3000,
        },
        target: MeterTarget::Vpc(name("blue")),
    }));
    lab.apply(1, changes);
    let secs = 3.0;
    let sink = lab.serve(&lab.b, &["udp-sink", "10.2.0.2", "9000", "5"]);
    std::thread::sleep(Duration::from_millis(300));
    let sent = lab.ask(
        &lab.a,
        &["udp-flood", "10.2.0.2", "9000", "958", &secs.to_string()],
    );
    let out = finish_server(sink);
    let f: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let (packets, first, last) = (f[0], f[2], f[3]);
    // Frame bytes on the wire: 958 payload + 8 UDP + 20 IPv4 + 14 Ethernet = 1000.
    let frame_bytes = packets * 1000.0;
    let window = last - first;
    let rate = frame_bytes / window;
    let sent: f64 = sent.parse().unwrap();
    println!(
        "flood: sent {sent} packets ({:.0} B/s offered), received {packets} in {window:.2} s = {rate:.0} B/s, cir {cir}",
        sent * 1000.0 / secs
    );
    assert!(
        sent * 1000.0 / secs > 2.0 * cir as f64,
        "the flood did not exceed the rate"
    );
    let err = (rate - cir as f64).abs() / cir as f64;
    assert!(
        err < 0.10,
        "rate {rate:.0} B/s is {:.1}% off {cir}",
        err * 100.0
    );
    lab.finish();
}

/// Port roles are enforced per object, through the real link: a VPC on an uplink port fails
/// naming the field, and the valid route in the same batch applies.
#[test]
fn an_object_naming_a_wrong_port_fails_alone() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("roles");
    let base = lab.base();
    lab.apply(1, base);
    let bad = Change::UpsertVpc(Vpc {
        name: name("red"),
        vni: Vni::new(200).unwrap(),
        table: TableId(20),
        ports: [lab.ports[2]].into_iter().collect(),
    });
    let ok = route(BLUE, "10.3.0.0/24", Nexthop::Blackhole);
    let ok_key = ok.object();
    match lab.link.apply(2, false, vec![ok, bad]) {
        Message::Ack(a) => {
            assert_eq!(a.epoch, 2);
            let st: std::collections::BTreeMap<_, _> = a.status.into_iter().collect();
            match &st[&ObjectKey::Vpc(name("red"))] {
                OffloadStatus::Failed { reason } => {
                    assert!(reason.to_string().contains("ports[0]"), "{reason}")
                }
                other => panic!("{other:?}"),
            }
            assert!(
                !matches!(st[&ok_key], OffloadStatus::Failed { .. }),
                "{st:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The route of batch 2 is in force: deleting it is acknowledged, with no status left.
    match lab.link.apply(
        3,
        false,
        vec![Change::DeleteRoute(RouteKey {
            table: BLUE,
            prefix: pfx("10.3.0.0/24"),
        })],
    ) {
        Message::Ack(a) => assert!(a.status.iter().all(|(k, _)| *k != ok_key), "{a:?}"),
        other => panic!("{other:?}"),
    }
    let keys: BTreeSet<u16> = lab.ports.iter().map(|p| p.0).collect();
    assert_eq!(keys.len(), 3);
    lab.finish();
}
