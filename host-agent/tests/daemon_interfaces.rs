//! The daemon's interface manager end to end, with no DPU configured: the real `host-agent`
//! binary and a real etcd, both in a namespace this test makes (the daemon entered with
//! `nsenter --net`, so its namespace binds land where this test sees them); VPCs created and
//! deleted with `dpuctl` become, and stop being, VRF namespaces with a bridge and a VXLAN device.
//! Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

struct Site {
    ns: String,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Site {
    fn spawn(&mut self, args: &[&str], log: &Path) {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    fn dpuctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(env!("CARGO_BIN_EXE_dpuctl"))
            .args(["--server", "http://127.0.0.1:50051"])
            .args(args)
            .output()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("host-agent.log")).unwrap_or_default()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.join("vrfs")) {
            for e in entries.flatten() {
                let _ = Command::new("umount").arg(e.path()).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn eventually(what: &str, site: &Site, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out: {what}\n{}",
            site.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn links_in(vrf: &Path) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", vrf.display()))
        .args(["ip", "-d", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vpcs_become_vrf_interfaces_and_go_with_them_without_any_dpu() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns = format!("dae-ifm-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    let _ = Command::new("ip")
        .args(["-n", &ns, "link", "set", "lo", "up"])
        .status();
    let dir = std::env::temp_dir().join(&ns);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("vrfs")).unwrap();
    let mut site = Site {
        ns,
        dir: dir.clone(),
        children: Vec::new(),
    };
    let data = dir.join("etcd");
    site.spawn(
        &[
            "etcd",
            "--name",
            "i",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            "http://127.0.0.1:2379",
            "--advertise-client-urls",
            "http://127.0.0.1:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "i=http://127.0.0.1:2380",
        ],
        &dir.join("etcd.log"),
    );
    let cfg = dir.join("host-agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n[api]\nlisten = \"127.0.0.1:50051\"\n[metrics]\nlisten = \"127.0.0.1:9108\"\n[interfaces]\nbackend = \"netns\"\nnetns_dir = \"{}\"\n",
            dir.join("vrfs").display()
        ),
    )
    .unwrap();
    site.spawn(
        &[
            env!("CARGO_BIN_EXE_host-agent"),
            "--config",
            cfg.to_str().unwrap(),
        ],
        &dir.join("host-agent.log"),
    );
    eventually("the API and etcd", &site, || {
        site.dpuctl(&[
            "node",
            "set",
            "--vtep",
            "192.0.2.7",
            "--router-mac",
            "02:dc:00:00:00:07",
            "--uplink",
            "0",
        ])
        .status
        .success()
    });
    for (name, vni, table) in [("blue", "1000", "10"), ("red", "2000", "20")] {
        let out = site.dpuctl(&["vpc", "create", name, "--vni", vni, "--table", table]);
        assert!(out.status.success(), "{out:?}");
    }
    let blue = dir.join("vrfs/blue");
    let red = dir.join("vrfs/red");
    eventually("blue's and red's VRF namespaces", &site, || {
        let b = links_in(&blue);
        let r = links_in(&red);
        b.contains("br1000")
            && b.contains("vxlan id 1000 local 192.0.2.7")
            && b.contains("master br1000")
            && r.contains("vxlan id 2000 local 192.0.2.7")
    });
    assert!(links_in(&blue).contains("02:dc:00:00:00:07"));
    let out = site.dpuctl(&["vpc", "delete", "red"]);
    assert!(out.status.success(), "{out:?}");
    eventually("red's namespace removed", &site, || !red.exists());
    assert!(links_in(&blue).contains("vxlan id 1000"), "blue untouched");
    assert!(site.log().contains("VPC gone"), "{}", site.log());
    // SIGTERM: the daemon exits 0.
    let daemon = site.children.pop().unwrap();
    let pid = daemon.id();
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let mut daemon = daemon;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}\n{}", site.log());
}
