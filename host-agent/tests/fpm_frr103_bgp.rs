//! `bgp suppress-fib-pending` with offload feedback, FRR 10.3 from the Debian 13 chroot in
//! three namespaces: C (AS 65003) originates 10.11.0.0/24 and 10.13.0.0/24 to A (AS 65001,
//! zebra with FPM and `--asic-offload=notify_on_offload`), which advertises to B (AS 65002)
//! only what its FIB holds. The test acknowledges 10.11 as offloaded and 10.13 as failed:
//! B must learn 10.11 and never 10.13.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod frr;

use std::path::{Path, PathBuf};
use std::time::Duration;

use flow_offload::model::Change;
use flow_offload::status::{FailReason, OffloadStatus};
use frr::*;
use host_agent::fpm::{FeedbackEncoder, Rib, ServerEvent, TableEncoding};

const PEERS_ENV: &str = "DPUCP_BGP_PEERS";

struct KillOnDrop(Vec<PathBuf>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for d in &self.0 {
            kill_pid_files(d);
        }
    }
}

fn chroot() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/frr-chroot");
    let out = std::process::Command::new(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn ip(args: &[&str]) {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn bgp_prefixes(frr: &Frr) -> Vec<String> {
    let text = frr.vtysh(&["-c", "show ip bgp json"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["routes"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn frr103_bgp_suppress_fib_pending_follows_feedback() {
    let Some(ns) = inner_netns() else {
        let root = chroot();
        let a = Netns::new("bgpa");
        let b = Netns::new("bgpb");
        let c = Netns::new("bgpc");
        ip(&[
            "-n", &a.name, "link", "add", "ab", "type", "veth", "peer", "name", "ba", "netns",
            &b.name,
        ]);
        ip(&[
            "-n", &a.name, "link", "add", "ac", "type", "veth", "peer", "name", "ca", "netns",
            &c.name,
        ]);
        for (n, dev, addr) in [
            (&a.name, "ab", "10.0.2.1/24"),
            (&b.name, "ba", "10.0.2.2/24"),
            (&a.name, "ac", "10.0.3.1/24"),
            (&c.name, "ca", "10.0.3.2/24"),
        ] {
            ip(&["-n", n, "addr", "add", addr, "dev", dev]);
            ip(&["-n", n, "link", "set", dev, "up"]);
        }
        let _guard = KillOnDrop(vec![
            root.join(format!("tmp/dpucp-fpm-{}", b.name)),
            root.join(format!("tmp/dpucp-fpm-{}", c.name)),
        ]);
        let peers = format!("{},{}", b.name, c.name);
        a.run_inner_at(
            &root,
            "frr103_bgp_suppress_fib_pending_follows_feedback",
            Duration::from_secs(150),
            &[(CHROOT_ENV, root.to_str().unwrap()), (PEERS_ENV, &peers)],
        );
        return;
    };
    let root = PathBuf::from(std::env::var(CHROOT_ENV).unwrap());
    let peers = std::env::var(PEERS_ENV).unwrap();
    let (b_ns, c_ns) = peers.split_once(',').unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // C: originates the two prefixes.
        let mut c = Frr::in_netns(&root, c_ns, c_ns);
        for d in ["mgmtd", "zebra", "staticd", "bgpd"] {
            c.start(d, &[]);
        }
        c.load_config(
            "frr.conf",
            "ip route 10.11.0.0/24 blackhole\nip route 10.13.0.0/24 blackhole\n\
             router bgp 65003\n bgp router-id 10.0.3.2\n no bgp ebgp-requires-policy\n\
             neighbor 10.0.3.1 remote-as 65001\n neighbor 10.0.3.1 timers connect 1\n\
             address-family ipv4 unicast\n  redistribute static\n exit-address-family\n",
        );
        // B: the observer.
        let mut b = Frr::in_netns(&root, b_ns, b_ns);
        for d in ["mgmtd", "zebra", "bgpd"] {
            b.start(d, &[]);
        }
        b.load_config(
            "frr.conf",
            "router bgp 65002\n bgp router-id 10.0.2.2\n no bgp ebgp-requires-policy\n\
             neighbor 10.0.2.1 remote-as 65001\n neighbor 10.0.2.1 timers connect 1\n",
        );
        // A: the gateway, with our FPM server (see fpm_frr103.rs for -R 0).
        let mut a = Frr::new(&root, &ns);
        let enc = TableEncoding::detect(&a.zebra_version(), None);
        let (server, mut rx) = server(FeedbackEncoder::new(enc)).await;
        a.start("mgmtd", &[]);
        a.start(
            "zebra",
            &[
                "-M",
                "dplane_fpm_nl",
                "--asic-offload=notify_on_offload",
                "-R",
                "0",
            ],
        );
        a.start("bgpd", &[]);
        a.load_config(
            "frr.conf",
            "fpm address 127.0.0.1 port 2620\n\
             router bgp 65001\n bgp router-id 10.0.3.1\n no bgp ebgp-requires-policy\n\
             bgp suppress-fib-pending\n\
             neighbor 10.0.3.2 remote-as 65003\n neighbor 10.0.3.2 timers connect 1\n\
             neighbor 10.0.2.2 remote-as 65002\n neighbor 10.0.2.2 timers connect 1\n",
        );
        let mut attr = attribution(&[0, 254]);
        attr.ports
            .insert(ifindex("ac"), flow_offload::model::PortId(2));
        let mut rib = Rib::new();
        let fb = server.feedback();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        let (p11, p13): (flow_offload::model::Prefix, flow_offload::model::Prefix) = (
            "10.11.0.0/24".parse().unwrap(),
            "10.13.0.0/24".parse().unwrap(),
        );
        let mut acked = 0;
        let mut seen_by_b = Vec::new();
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(ServerEvent::Events(evs))) =
                tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
            {
                let mut batch = host_agent::fpm::ChangeBatch::new();
                rib.apply_all(&evs, &attr, &mut batch);
                for ch in batch.changes() {
                    let Change::UpsertRoute(r) = ch else { continue };
                    let status = if r.key.prefix == p11 {
                        OffloadStatus::Offloaded
                    } else if r.key.prefix == p13 {
                        OffloadStatus::Failed {
                            reason: FailReason::SoftwareTableFull,
                        }
                    } else {
                        continue;
                    };
                    let z = rib.zebra_route(&r.key).unwrap();
                    assert_eq!(z.protocol, 186, "BGP routes carry rtm_protocol 186");
                    // Before any acknowledgement, B has neither prefix.
                    if acked == 0 {
                        let seen = bgp_prefixes(&b);
                        assert!(
                            !seen
                                .iter()
                                .any(|p| p == "10.11.0.0/24" || p == "10.13.0.0/24"),
                            "advertised before the FIB acknowledged: {seen:?}"
                        );
                    }
                    fb.ack([(&z, &status)]).await.unwrap();
                    acked += 1;
                }
            }
            if acked >= 2 {
                seen_by_b = bgp_prefixes(&b);
                if seen_by_b.iter().any(|p| p == "10.11.0.0/24") {
                    break;
                }
            }
        }
        assert_eq!(
            acked,
            2,
            "A installed both prefixes; counters {:?}",
            server.counters()
        );
        assert!(
            seen_by_b.iter().any(|p| p == "10.11.0.0/24"),
            "B: {seen_by_b:?}"
        );
        // The failed prefix stays withheld (checked again after B has converged on 10.11).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let seen = bgp_prefixes(&b);
        assert!(
            !seen.iter().any(|p| p == "10.13.0.0/24"),
            "B learned a failed route: {seen:?}"
        );
        let a_json = a.vtysh(&["-c", "show ip route 10.13.0.0/24 json"]);
        let v: serde_json::Value = serde_json::from_str(&a_json).unwrap();
        assert_eq!(
            v["10.13.0.0/24"][0]["offloaded"],
            serde_json::Value::Bool(false),
            "{a_json}"
        );
        a.stop();
        b.stop();
        c.stop();
    });
}
