//! The lab end to end: `scripts/lab up` under a prefix of its own, then checks from outside
//! (FRR's JSON, `dpuctl --json`, traffic), restarts, route churn, bad input, and `scripts/lab
//! down`. Needs root and the packages of `.ci/run`; run by `scripts/test` after the binaries are
//! built (`cargo test --workspace` builds them). The labs run one at a time: each one is two
//! DPU agents, two FRRs and two etcds on a two-core machine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{bin_dir, is_root};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn can_run() -> bool {
    let root = is_root();
    if !root {
        eprintln!("skipped: needs root");
    }
    root
}

/// One running lab; `scripts/lab down` on drop.
struct Lab {
    prefix: String,
    up_output: String,
}

impl Lab {
    /// `scripts/lab up`; panics with its output if it fails (it checks traffic itself).
    fn up(prefix: &str) -> Lab {
        let mut lab = Lab {
            prefix: prefix.to_owned(),
            up_output: String::new(),
        };
        // A lab left over from an interrupted run.
        let _ = lab.run(&["down"]);
        let out = lab.run(&["up"]);
        lab.up_output = text(&out);
        assert!(
            out.status.success(),
            "scripts/lab up failed:\n{}",
            lab.up_output
        );
        lab
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(root().join("scripts/lab"))
            .args(args)
            .env("LAB_PREFIX", &self.prefix)
            .env("LAB_BIN", bin_dir())
            .env("LAB_SKIP_BUILD", "1")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "scripts/lab {args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn dpuctl_json(&self, site: &str, args: &[&str]) -> Value {
        let mut a = vec!["dpuctl", site, "--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("dpuctl {args:?}: {e}: {out}"))
    }

    fn vtysh_json(&self, site: &str, cmd: &str) -> Value {
        let out = self.ok(&["vtysh", site, "-c", cmd]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("vtysh {cmd}: {e}: {out}"))
    }

    /// The routes of VPC blue on one site's DPU that came from FRR.
    fn learned(&self, site: &str) -> Vec<Value> {
        self.dpuctl_json(site, &["routes", "--vpc", "blue"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["source"] == "frr")
            .cloned()
            .collect()
    }

    /// Route statuses the site's first DPU (`dpu-a`, `dpu-b`; site a also has `dpu-a2`, its
    /// pair's other member) reported, by object name ("route P in table T").
    fn route_statuses(&self, site: &str) -> Vec<(String, String)> {
        self.dpuctl_json(site, &["status", "--dpu", &format!("dpu-{site}")])
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["object"].as_str().unwrap_or("").starts_with("route "))
            .map(|s| {
                (
                    s["object"].as_str().unwrap().to_owned(),
                    s["placement"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// FRR's count of routes in VRF blue that zebra shows offloaded.
    fn frr_offloaded(&self, site: &str) -> (u64, u64) {
        let v = self.vtysh_json(site, "show ip route vrf blue summary json");
        let routes = v["routes"].as_array().unwrap();
        let sum = |k: &str| routes.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum();
        (sum("rib"), sum("fibOffLoaded"))
    }

    /// Retries `scripts/lab traffic` until it passes (after a restart the host agent must
    /// resend first), bounded.
    fn traffic_passes_within(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.run(&["traffic"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "traffic still failing after {limit:?}:\n{}\n{}",
                text(&out),
                text(&self.run(&["status"]))
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits until `f` is true, panicking with `what` after `limit`.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A log without its ANSI colours.
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

fn route_flags(v: &Value, prefix: &str) -> (bool, bool, bool) {
    let r = &v[prefix][0];
    (
        r["offloaded"] == true,
        r["trapped"] == true,
        r["queued"] == true,
    )
}

fn netns_names() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

#[test]
fn lab_evpn_type5_nat_meter_and_restarts() {
    if !can_run() {
        return;
    }
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("e2e1");
    // What `up` checked, as it printed it: both directions, UDP and TCP, NAT, the meter.
    for line in [
        "udp a -> b: 10.1.1.10:",
        "tcp a -> b: 10.1.1.10:",
        "udp b -> a: 10.2.1.10:",
        "tcp b -> a: 10.2.1.10:",
        "nat44 tcp from site a: the server saw 198.51.100.",
        "nat64 udp from site b: the server saw 198.51.100.",
        // VPC red has blue's addresses: blue reaches none of red's hosts, red's own traffic flows.
        "blue a -> b, where only red listens: TIMEOUT",
        "red a -> b: 10.1.1.10:",
        "received ",
    ] {
        assert!(lab.up_output.contains(line), "{line}\n{}", lab.up_output);
    }

    // BGP underlay: the remote VTEP learned over BGP reached the DPU and zebra shows it taken
    // (trapped: the DPU forwards it in software; net_tap takes no rules).
    for (site, vtep) in [("a", "192.0.2.2/32"), ("b", "192.0.2.1/32")] {
        let v = lab.vtysh_json(site, &format!("show ip route {vtep} json"));
        assert_eq!(route_flags(&v, vtep), (true, true, false), "{site}: {v}");
        let st = lab.route_statuses(site);
        assert!(
            st.iter()
                .any(|(o, p)| o == &format!("route {vtep} in table 254") && p == "software"),
            "{site}: {st:?}"
        );
    }

    // EVPN type-5: site a's subnet is on site b's DPU as a VXLAN route with the VNI, the
    // remote VTEP and site a's router MAC; and the other way round.
    for (site, prefix, vtep, rmac) in [
        ("b", "10.1.1.0/24", "192.0.2.1", "02:dc:00:00:01:01"),
        ("a", "10.2.1.0/24", "192.0.2.2", "02:dc:00:00:02:01"),
    ] {
        let learned = lab.learned(site);
        assert_eq!(learned.len(), 1, "{site}: {learned:?}");
        let r = &learned[0];
        assert_eq!(r["key"]["prefix"], prefix);
        assert_eq!(r["key"]["table"], 10);
        let vx = &r["nexthops"][0]["kind"]["vxlan"];
        assert_eq!(vx["vni"], 1000, "{r}");
        assert_eq!(vx["remote_vtep"], vtep, "{r}");
        assert_eq!(vx["router_mac"], rmac, "{r}");
        let v = lab.vtysh_json(site, &format!("show ip route vrf blue {prefix} json"));
        assert_eq!(route_flags(&v, prefix), (true, true, false), "{site}: {v}");
    }

    // kill -9 the DPU agent of site b: the host agent resends everything; traffic flows again
    // and every route is reported by the new agent.
    let before = lab.route_statuses("b");
    lab.ok(&["restart", "b", "dpu-agent"]);
    lab.traffic_passes_within(Duration::from_secs(60));
    eventually(
        "site b's statuses after the DPU agent restart",
        Duration::from_secs(30),
        || lab.route_statuses("b") == before,
    );

    // Long-lived TCP and UDP flows through NAPT44 and NAT64 from site a's VPC host, a numbered
    // message every 100 ms, across everything below: none may be reset, lose a message or
    // change its outside address and port.
    lab.ok(&["flows", "start", "40"]);

    // kill -9 the host agent of site a: zebra reconnects and replays, every route is
    // acknowledged again (nothing stays queued), traffic flows.
    let dpu_log = Path::new("/run/dpucp-lab/e2e1/a/dpu-agent.log");
    let seen = std::fs::read_to_string(dpu_log).unwrap().len();
    lab.ok(&["restart", "a", "host-agent"]);
    // Its DPU links wait for zebra's replay, so its first resync equals what the DPU has:
    // FRR's routes are not withdrawn meanwhile.
    eventually(
        "the restarted host agent's resync",
        Duration::from_secs(30),
        || plain(&std::fs::read_to_string(dpu_log).unwrap()[seen..]).contains("full=true"),
    );
    let after = plain(&std::fs::read_to_string(dpu_log).unwrap()[seen..]);
    let resync = after
        .lines()
        .find(|l| l.contains("batch applied") && l.contains("full=true"))
        .unwrap();
    assert!(resync.contains(" changes=0 "), "{resync}");
    // Configuration made after the restart reaches the DPU (a restarted host agent numbers its
    // batches after the DPU's last epoch; the DPU once took lower epochs for replays and
    // acknowledged them without applying). Non-route changes rebuild the DPU's pipeline,
    // which must carry the NAT sessions over.
    eventually(
        "site a's API after the restart",
        Duration::from_secs(30),
        || lab.run(&["dpuctl", "a", "status"]).status.success(),
    );
    lab.ok(&[
        "dpuctl",
        "a",
        "nat",
        "create",
        "late",
        "--vpc",
        "blue",
        "--kind",
        "static44",
        "--inside",
        "10.1.1.50",
        "--outside",
        "198.51.100.60",
    ]);
    lab.ok(&[
        "dpuctl", "a", "vpc", "create", "green", "--vni", "3000", "--table", "30",
    ]);
    // kill -9 of etcd: the flows keep going on the last state.
    lab.ok(&["restart", "a", "etcd"]);
    // Changed while the host agent is down (by another writer, here etcdctl): its full
    // resync after the restart carries the change.
    lab.ok(&["kill", "a", "host-agent"]);
    lab.ok(&[
        "exec", "a", "etcdctl", "--endpoints", "http://127.0.0.1:2379", "put",
        "/dpucp/v1/nat/offline",
        r#"{"name":"offline","vpc":"blue","kind":{"Static44":{"inside":"10.1.1.51","outside":"198.51.100.61"}}}"#,
    ]);
    lab.ok(&["start", "a", "host-agent"]);
    eventually(
        "the NAT rules and VPC made around the restarts on site a's DPU",
        Duration::from_secs(30),
        || {
            let st = lab.dpuctl_json("a", &["status"]).to_string();
            ["nat late", "nat offline", "vpc green"]
                .iter()
                .all(|o| st.contains(o))
        },
    );
    let flows = lab.run(&["flows", "report"]);
    assert!(flows.status.success(), "flows:\n{}", text(&flows));
    eprintln!("{}", text(&flows));
    lab.traffic_passes_within(Duration::from_secs(60));
    eventually(
        "site a's routes re-acknowledged after the host agent restart",
        Duration::from_secs(30),
        || {
            let v = lab.vtysh_json("a", "show ip route vrf blue 10.2.1.0/24 json");
            let u = lab.vtysh_json("a", "show ip route 192.0.2.2/32 json");
            route_flags(&v, "10.2.1.0/24") == (true, true, false)
                && route_flags(&u, "192.0.2.2/32") == (true, true, false)
        },
    );

    // Site a's A/B pair (`lab up` waited for one active and one Ready standby): long-lived
    // flows through NAPT44 and NAT64 across a kill -9 of the active member. None may be reset
    // or change its outside address and port (the session moved to the standby with it); a
    // UDP message in flight while the dead member's ports vanish may be lost, and is reported.
    lab.ok(&["flows", "start", "20"]);
    std::thread::sleep(Duration::from_secs(3));
    let failover = lab.run(&["failover", "a"]);
    eprintln!("{}", text(&failover));
    assert!(failover.status.success(), "failover:\n{}", text(&failover));
    let killed = plain(&text(&failover))
        .lines()
        .find_map(|l| {
            l.split("failover: ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(|id| id.trim_start_matches("dpu-").to_owned())
        })
        .unwrap();
    // The killed member comes back as a Ready standby (no failback).
    lab.ok(&["start", &killed, "dpu-agent"]);
    eventually(
        "the restarted member a Ready standby",
        Duration::from_secs(60),
        || {
            let dpus = lab.dpuctl_json("a", &["dpus"]);
            let me = format!("dpu-{killed}");
            dpus.as_array().unwrap().iter().any(|d| {
                d["id"] == me.as_str()
                    && d["pair"]["role"] == "standby"
                    && d["pair"]["ready"] == true
            })
        },
    );

    // Bad input through the API changes nothing.
    let routes_before = lab.dpuctl_json("a", &["routes", "--vpc", "blue"]);
    let nat_before = lab.dpuctl_json("a", &["nat", "list"]);
    for (args, want) in [
        (
            vec![
                "route",
                "add",
                "10.9.0.0/33",
                "--vpc",
                "blue",
                "--nh",
                "blackhole",
            ],
            "prefix",
        ),
        (
            vec![
                "route",
                "add",
                "10.9.0.0/16",
                "--vpc",
                "nosuch",
                "--nh",
                "blackhole",
            ],
            "nosuch",
        ),
        (
            // Its outside address is in the NAT64 rule's pool.
            vec![
                "nat",
                "create",
                "clash",
                "--vpc",
                "blue",
                "--kind",
                "static44",
                "--inside",
                "10.1.1.10",
                "--outside",
                "198.51.100.25",
            ],
            "overlaps",
        ),
    ] {
        let mut a = vec!["dpuctl", "a"];
        a.extend_from_slice(&args);
        let out = lab.run(&a);
        assert!(!out.status.success(), "{args:?} was accepted");
        let t = text(&out);
        assert!(t.contains(want), "{args:?}: {t}");
    }
    assert_eq!(
        lab.dpuctl_json("a", &["routes", "--vpc", "blue"]),
        routes_before
    );
    assert_eq!(lab.dpuctl_json("a", &["nat", "list"]), nat_before);

    drop(lab);
    let left = netns_names();
    assert!(!left.contains("e2e1-"), "namespaces left: {left}");
    assert!(!Path::new("/run/dpucp-lab/e2e1").exists());
}

#[test]
fn lab_route_churn_10k_with_a_dpu_restart() {
    if !can_run() {
        return;
    }
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("e2e2");
    const N: usize = 10_000;
    let prefixes: Vec<String> = (0..N)
        .map(|i| format!("172.{}.{}.0/24", 16 + i / 256, i % 256))
        .collect();
    let file = |negate: bool| {
        let mut t = String::from("router bgp 65002 vrf blue\n address-family ipv4 unicast\n");
        for p in &prefixes {
            t.push_str(&format!(
                "  {}network {p}\n",
                if negate { "no " } else { "" }
            ));
        }
        t.push_str(" exit-address-family\nexit\n");
        let path = std::env::temp_dir().join(format!("lab-churn-{}.conf", negate));
        std::fs::write(&path, t).unwrap();
        path
    };
    let advertise = file(false);
    let withdraw = file(true);
    let limit = Duration::from_secs(180);

    // Site b advertises 10k prefixes in VPC blue: site a's DPU gets them all, and zebra on
    // site a shows them offloaded.
    lab.ok(&["frr-config", "b", advertise.to_str().unwrap()]);
    eventually("10k routes on site a's DPU", limit, || {
        lab.learned("a").len() == N + 1
    });
    eventually("10k routes offloaded in site a's zebra", limit, || {
        lab.frr_offloaded("a") == ((N + 1) as u64, (N + 1) as u64)
    });

    // Withdrawn: nothing stale remains on the DPU or in its statuses.
    lab.ok(&["frr-config", "b", withdraw.to_str().unwrap()]);
    eventually("the withdrawal on site a's DPU", limit, || {
        lab.learned("a").len() == 1
    });
    eventually("no stale statuses on site a", limit, || {
        lab.route_statuses("a")
            .iter()
            .all(|(o, _)| !o.starts_with("route 172."))
    });
    assert_eq!(lab.frr_offloaded("a"), (1, 1));

    // Re-advertised, with site a's DPU agent killed -9 in the middle: the host agent resends
    // and everything converges; no object is lost.
    lab.ok(&["frr-config", "b", advertise.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(500));
    lab.ok(&["restart", "a", "dpu-agent"]);
    eventually("10k routes back on site a's DPU", limit, || {
        lab.learned("a").len() == N + 1
    });
    eventually("10k route statuses from the restarted DPU", limit, || {
        lab.route_statuses("a")
            .iter()
            .filter(|(o, _)| o.starts_with("route 172.") && o.ends_with("in table 10"))
            .count()
            == N
    });
    eventually(
        "10k routes offloaded in site a's zebra again",
        limit,
        || lab.frr_offloaded("a") == ((N + 1) as u64, (N + 1) as u64),
    );
    lab.traffic_passes_within(Duration::from_secs(60));
    let _ = std::fs::remove_file(advertise);
    let _ = std::fs::remove_file(withdraw);
}
