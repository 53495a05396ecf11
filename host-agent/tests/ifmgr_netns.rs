//! The interface manager against the real kernel, netns backend (this kernel has no VRF
//! devices). Each test makes its own "site" namespace and VRF directory, runs the manager from
//! a thread inside that site, checks with an independent observer (`ip -d -j link show` in each
//! VRF namespace), and removes what it made. Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use host_agent::ifmgr::{Backend, InterfaceManager, Report, Step, VpcInterfaces};
use serde_json::Value;

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A site namespace and a VRF directory; everything removed on drop.
struct Site {
    name: String,
    dir: PathBuf,
}

impl Site {
    fn new(tag: &str) -> Site {
        let name = format!("ifm-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        let dir = std::env::temp_dir().join(format!("{name}-vrfs"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Site { name, dir }
    }

    fn manager(&self) -> InterfaceManager {
        InterfaceManager::new(Backend::Netns {
            dir: self.dir.clone(),
        })
    }

    /// Reconciles from a thread inside the site namespace.
    fn reconcile(&self, want: &BTreeMap<String, VpcInterfaces>) -> Report {
        let m = self.manager();
        let want = want.clone();
        let site = std::fs::File::open(Path::new("/run/netns").join(&self.name)).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(site.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            m.reconcile(&want).unwrap()
        })
        .join()
        .unwrap()
    }

    /// `ip -d -j link show` inside a VRF namespace, by interface name.
    fn links(&self, vpc: &str) -> BTreeMap<String, Value> {
        let ns = self.dir.join(vpc);
        let out = sh(&[
            "nsenter",
            &format!("--net={}", ns.display()),
            "ip",
            "-d",
            "-j",
            "link",
            "show",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| (l["ifname"].as_str().unwrap().to_owned(), l.clone()))
            .collect()
    }

    fn in_vrf(&self, vpc: &str, args: &[&str]) {
        let ns = format!("--net={}", self.dir.join(vpc).display());
        let mut a = vec!["nsenter", ns.as_str()];
        a.extend_from_slice(args);
        sh(&a);
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let _ = Command::new("umount").arg(e.path()).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn vpc(name: &str, vni: u32, table: u32) -> (String, VpcInterfaces) {
    (
        name.to_owned(),
        VpcInterfaces {
            vpc: name.to_owned(),
            vni,
            table,
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            router_mac: [2, 0xdc, 0, 0, 1, 1],
        },
    )
}

/// The VRF namespace holds what FRR needs, as an independent observer sees it.
fn assert_right(site: &Site, name: &str, vni: u32) -> (u64, u64) {
    let links = site.links(name);
    let br = &links[&format!("br{vni}")];
    let vx = &links[&format!("vx{vni}")];
    assert_eq!(br["linkinfo"]["info_kind"], "bridge", "{br}");
    assert_eq!(br["address"], "02:dc:00:00:01:01", "{br}");
    assert!(
        br["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{br}"
    );
    let data = &vx["linkinfo"]["info_data"];
    assert_eq!(vx["linkinfo"]["info_kind"], "vxlan", "{vx}");
    assert_eq!(data["id"], vni, "{vx}");
    assert_eq!(data["local"], "192.0.2.1", "{vx}");
    assert_eq!(data["port"], 4789, "{vx}");
    assert_eq!(data["learning"], false, "{vx}");
    assert_eq!(vx["master"], format!("br{vni}"), "{vx}");
    assert!(
        vx["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{vx}"
    );
    // Made in the site's namespace and moved: its socket stays in the underlay.
    assert!(vx.get("link_netnsid").is_some(), "{vx}");
    assert!(links["lo"]["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "UP"));
    (
        br["ifindex"].as_u64().unwrap(),
        vx["ifindex"].as_u64().unwrap(),
    )
}

#[test]
fn ifmgr_netns_reconcile_create_idempotent_fix_and_remove() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let site = Site::new("a");
    let want: BTreeMap<String, VpcInterfaces> = [vpc("blue", 1000, 10), vpc("red", 2000, 20)]
        .into_iter()
        .collect();

    // Two VPCs from nothing.
    let r = site.reconcile(&want);
    assert_eq!(r.changed.len(), 2, "{r:?}");
    let blue = assert_right(&site, "blue", 1000);
    let red = assert_right(&site, "red", 2000);

    // Again: nothing changes, same ifindexes.
    let r = site.reconcile(&want);
    assert_eq!(r, Report::default());
    assert_eq!(assert_right(&site, "blue", 1000), blue);

    // Someone broke parts of blue: only those are fixed, the devices stay.
    site.in_vrf("blue", &["ip", "link", "set", "vx1000", "down"]);
    site.in_vrf(
        "blue",
        &[
            "ip",
            "link",
            "set",
            "br1000",
            "address",
            "02:00:00:00:00:99",
        ],
    );
    let r = site.reconcile(&want);
    assert_eq!(r.changed["blue"], vec![Step::BridgeMac, Step::VxlanUp]);
    assert_eq!(assert_right(&site, "blue", 1000), blue);

    // A VXLAN device with the wrong VNI is replaced (a VNI cannot change in place).
    site.in_vrf("blue", &["ip", "link", "del", "vx1000"]);
    site.in_vrf(
        "blue",
        &[
            "ip",
            "link",
            "add",
            "vx1000",
            "type",
            "vxlan",
            "id",
            "7",
            "dstport",
            "4789",
            "local",
            "192.0.2.1",
        ],
    );
    let r = site.reconcile(&want);
    assert_eq!(
        r.changed["blue"],
        vec![
            Step::Delete("vxlan"),
            Step::CreateVxlan,
            Step::VxlanIntoBridge,
            Step::VxlanUp
        ]
    );
    let (br_after, _) = assert_right(&site, "blue", 1000);
    assert_eq!(br_after, blue.0, "the bridge was right and stays");

    // Red deleted: its namespace goes, blue is untouched.
    let only_blue: BTreeMap<String, VpcInterfaces> = [vpc("blue", 1000, 10)].into_iter().collect();
    let r = site.reconcile(&only_blue);
    assert_eq!(r.removed, vec!["red".to_owned()]);
    assert!(r.changed.is_empty());
    assert!(!site.dir.join("red").exists());
    assert_eq!(assert_right(&site, "blue", 1000).0, blue.0);
    let _ = red;

    // A namespace in the directory that is not ours is left alone.
    let foreign = site.dir.join("other");
    std::fs::write(&foreign, b"").unwrap();
    sh(&["unshare", &format!("--net={}", foreign.display()), "true"]);
    let r = site.reconcile(&only_blue);
    assert!(r.removed.is_empty(), "{r:?}");
    assert!(foreign.exists());
}
