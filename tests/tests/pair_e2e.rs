//! An A/B pair end to end, every process real: etcd, the `host-agent` daemon with two DPU
//! entries in one pair, and two `dpu-agent`s (reference NIC backend over `net_null` ports,
//! each with an `[ha]` section, syncing to each other over loopback). What it shows, through
//! `dpuctl dpus`:
//! - exactly one member is active, the other standby and Ready, both in the same epoch;
//! - kill -9 of the active: the standby becomes active in a larger epoch (the time is printed);
//! - the killed member restarts and comes back standby (no failback), and Ready again;
//! - SIGSTOP of the active for 5 s: the other member takes over, and the stopped one, once
//!   continued, never reports itself active in an old epoch: it comes back fenced or standby.
//!
//! And with nftables cutting links inside the test's own network namespace:
//! - the sync link cut: both members stay in their roles, the standby goes NotReady, and
//!   catches up (Ready) once the link is back;
//! - the host agent cut off from etcd: no renewal proves the active's lease, so it fences
//!   itself (stops allocating) and nobody is active; healed, one member is active again, in an
//!   epoch no lower than before;
//! - `dpuctl dpu switchover` hands over to the other member in a newer epoch, and is refused
//!   while the standby is not Ready.
//!
//! Traffic through the pair (NAT sessions surviving the failover) needs TAP ports and the lab;
//! see `lab_e2e.rs`. Every process runs in a network namespace the test creates (and deletes).
//! Needs root (EAL, namespaces) and etcd; run by `scripts/test` after the binaries are built.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, eventually, free_port, is_root, Proc};
use serde_json::Value;

struct Pair {
    ns: String,
    sync_ports: (u16, u16),
    etcd_port: u16,
    metrics: String,
    dir: PathBuf,
    api: String,
    etcd: Proc,
    host: Proc,
    agents: Vec<(String, Proc, PathBuf)>,
    starts: u32,
}

fn agent_config(dir: &Path, id: &str, link: u16, member: &str, listen: u16, peer: u16) -> PathBuf {
    let cfg = format!(
        "dpu_id = \"{id}\"\n[eal]\nargs = [\"-l\", \"0\", \"--no-huge\", \"--no-pci\", \"--no-shconf\", \"-m\", \"128\", \"--file-prefix=pair-{id}\", \"--log-level=*:warning\"]\n\
         [[ports]]\nname = \"net_null0\"\ndevice = \"net_null0,no-rx=1\"\nrole = \"uplink\"\n\
         [[ports]]\nname = \"net_null1\"\ndevice = \"net_null1,no-rx=1\"\nrole = \"vpc\"\n\
         [lcores]\nforwarding = 0\n[link]\nlisten = \"127.0.0.1:{link}\"\n[nic]\nbackend = \"reference\"\n\
         [ha]\nmember = \"{member}\"\nsync_listen = \"127.0.0.1:{listen}\"\npeer = \"127.0.0.1:{peer}\"\n"
    );
    let p = dir.join(format!("{id}.toml"));
    std::fs::write(&p, cfg).unwrap();
    p
}

/// `program` run inside the network namespace `ns`.
fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

impl Pair {
    fn start(tag: &str) -> Pair {
        let ns = format!("pair{tag}-{}", std::process::id() % 100_000);
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(std::process::Stdio::null())
            .status();
        assert!(Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success());
        assert!(in_ns(&ns, "ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        let dir = std::env::temp_dir().join(format!("dpucp-pair-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (client, peer) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let etcd = Proc::spawn(
            in_ns(
                &ns,
                std::env::var("ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".into()),
            )
            .args(["--name", "t", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("t=http://127.0.0.1:{peer}"),
                "--log-level",
                "warn",
            ]),
            dir.join("etcd.log"),
        );
        let (link_a, link_b, sync_a, sync_b) = (free_port(), free_port(), free_port(), free_port());
        let cfg_a = agent_config(&dir, "pa", link_a, "a", sync_a, sync_b);
        let cfg_b = agent_config(&dir, "pb", link_b, "b", sync_b, sync_a);
        let api_port = free_port();
        let metrics_port = free_port();
        let host_cfg = format!(
            "[etcd]\nendpoints = [\"{etcd_url}\"]\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n\
             [[dpus]]\nid = \"pa\"\nlink = \"127.0.0.1:{link_a}\"\npair = {{ group = \"site-a\", member = \"a\" }}\n\
             [[dpus]]\nid = \"pb\"\nlink = \"127.0.0.1:{link_b}\"\npair = {{ group = \"site-a\", member = \"b\" }}\n",
            metrics_port
        );
        std::fs::write(dir.join("host-agent.toml"), host_cfg).unwrap();
        let host = Proc::spawn(
            in_ns(&ns, bin("host-agent"))
                .arg("--config")
                .arg(dir.join("host-agent.toml"))
                .env("RUST_LOG", "info"),
            dir.join("host-agent.log"),
        );
        let mut me = Pair {
            ns,
            sync_ports: (sync_a, sync_b),
            etcd_port: client,
            metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
            api: format!("http://127.0.0.1:{api_port}"),
            dir,
            etcd,
            host,
            agents: Vec::new(),
            starts: 0,
        };
        for (id, cfg) in [("pa", cfg_a), ("pb", cfg_b)] {
            let p = me.spawn_agent(id, &cfg);
            me.agents.push((id.to_owned(), p, cfg));
        }
        me
    }

    fn spawn_agent(&mut self, id: &str, cfg: &Path) -> Proc {
        self.starts += 1;
        Proc::spawn(
            in_ns(&self.ns, bin("dpu-agent"))
                .arg("--config")
                .arg(cfg)
                .env("RUST_LOG", "info"),
            self.dir.join(format!("{id}-{}.log", self.starts)),
        )
    }

    fn agent(&mut self, id: &str) -> &mut Proc {
        &mut self.agents.iter_mut().find(|(i, _, _)| i == id).unwrap().1
    }

    fn restart(&mut self, id: &str) {
        let cfg = self
            .agents
            .iter()
            .find(|(i, _, _)| i == id)
            .unwrap()
            .2
            .clone();
        let p = self.spawn_agent(id, &cfg);
        *self.agent(id) = p;
    }

    fn logs(&self) -> String {
        let mut s = format!("--- host-agent\n{}\n", self.host.log());
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            let mut names: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            names.sort();
            for p in names {
                let n = p.file_name().unwrap().to_string_lossy().to_string();
                if n.starts_with('p') && n.ends_with(".log") {
                    s.push_str(&format!(
                        "--- {n}\n{}\n",
                        std::fs::read_to_string(&p).unwrap_or_default()
                    ));
                }
            }
        }
        s.push_str(&format!("--- etcd\n{}\n", self.etcd.log()));
        s
    }

    /// Each DPU's pair state as `dpuctl --json dpus` shows it.
    fn pair_states(&self) -> Vec<(String, Value)> {
        let o = in_ns(&self.ns, bin("dpuctl"))
            .args(["--server", &self.api, "--json", "dpus"])
            .output()
            .unwrap();
        if !o.status.success() {
            return Vec::new();
        }
        let dpus: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap_or_default();
        dpus.into_iter()
            .map(|d| (d["id"].as_str().unwrap_or("").to_owned(), d["pair"].clone()))
            .collect()
    }

    /// Drops, in the test's namespace, every TCP segment to or from `ports` (nftables).
    fn cut(&self, name: &str, ports: &[u16]) {
        let set = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet {name} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  tcp dport {{ {set} }} drop\n  tcp sport {{ {set} }} drop\n }}\n}}\n"
        );
        let path = self.dir.join(format!("{name}.nft"));
        std::fs::write(&path, rules).unwrap();
        let o = in_ns(&self.ns, "nft")
            .arg("-f")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn heal(&self, name: &str) {
        let o = in_ns(&self.ns, "nft")
            .args(["delete", "table", "inet", name])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// `dpucp_pair_role{dpu=ID}` from the host agent's metrics (served from memory, so it
    /// answers while etcd is unreachable, when `dpuctl dpus` cannot): 0 standby, 1 active,
    /// 2 fenced.
    fn metric_role(&self, id: &str) -> Option<u8> {
        let o = in_ns(&self.ns, "python3")
            .args([
                "-c",
                "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())",
                &self.metrics,
            ])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let want = format!("dpucp_pair_role{{dpu=\"{id}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&want))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u8)
    }

    fn state(&self, id: &str) -> Value {
        self.pair_states()
            .into_iter()
            .find(|(i, _)| i == id)
            .map(|(_, v)| v)
            .unwrap_or(Value::Null)
    }
}

fn role(v: &Value) -> &str {
    v["role"].as_str().unwrap_or("")
}

fn epoch(v: &Value) -> u64 {
    v["epoch"].as_u64().unwrap_or(0)
}

/// The active member and its epoch, once exactly one is active and the other is a Ready
/// standby in the same epoch.
fn settled(p: &Pair) -> Option<(String, u64)> {
    let s = p.pair_states();
    let (a, b) = (
        &s.iter().find(|(i, _)| i == "pa")?.1,
        &s.iter().find(|(i, _)| i == "pb")?.1,
    );
    let (act, stby, id) = match (role(a), role(b)) {
        ("active", "standby") => (a, b, "pa"),
        ("standby", "active") => (b, a, "pb"),
        _ => return None,
    };
    let ok = epoch(act) == epoch(stby)
        && stby["ready"] == Value::Bool(true)
        && act["ready"] == Value::Bool(true);
    ok.then(|| (id.to_owned(), epoch(act)))
}

#[test]
fn pair_fails_over_on_kill_and_stop_without_failback_or_stale_epoch() {
    if !is_root() {
        println!("SKIP: needs root (EAL)");
        return;
    }
    let mut p = Pair::start("f");
    let long = Duration::from_secs(60);
    let mut current = None;
    eventually(
        "one active, one Ready standby, same epoch",
        long,
        || {
            current = settled(&p);
            current.is_some()
        },
        || format!("{:?}\n{}", p.pair_states(), p.logs()),
    );
    let (first, epoch1) = current.clone().unwrap();
    let other = if first == "pa" { "pb" } else { "pa" };

    // kill -9 of the active: the standby takes over in a larger epoch.
    let t = Instant::now();
    p.agent(&first).kill9();
    eventually(
        "the standby becomes active",
        Duration::from_secs(20),
        || {
            let s = p.state(other);
            role(&s) == "active" && epoch(&s) > epoch1
        },
        || format!("{:?}\n{}", p.pair_states(), p.logs()),
    );
    println!(
        "pair failover after kill -9: {:?} until dpuctl shows {other} active",
        t.elapsed()
    );

    // The killed member restarts: standby (no failback), then Ready.
    p.restart(&first);
    eventually(
        "the restarted member is a Ready standby of the new active",
        long,
        || settled(&p).is_some_and(|(act, _)| act == other),
        || format!("{:?}\n{}", p.pair_states(), p.logs()),
    );
    let (_, epoch2) = settled(&p).unwrap();
    assert!(epoch2 > epoch1);

    // SIGSTOP of the active for 5 s: the host's link to it times out, the key goes to the
    // other member; continued, the stopped member must not report itself active in an old
    // epoch at any point.
    let pid = p.agent(other).child.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let stopped = Instant::now();
    eventually(
        "the other member takes over from the stopped one",
        Duration::from_secs(20),
        || {
            let s = p.state(&first);
            role(&s) == "active" && epoch(&s) > epoch2
        },
        || format!("{:?}\n{}", p.pair_states(), p.logs()),
    );
    let epoch3 = epoch(&p.state(&first));
    std::thread::sleep(Duration::from_secs(5).saturating_sub(stopped.elapsed()));
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut back = false;
    while Instant::now() < deadline {
        let s = p.state(other);
        if role(&s) == "active" {
            assert!(
                epoch(&s) > epoch3,
                "the continued member reports itself active in epoch {} (the new one is {epoch3})\n{}",
                epoch(&s),
                p.logs()
            );
        }
        if role(&s) == "standby" && epoch(&s) >= epoch3 {
            back = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        back,
        "the continued member did not come back as standby: {:?}\n{}",
        p.state(other),
        p.logs()
    );
    // And the active is still the one elected while it was stopped.
    let s = p.state(&first);
    assert_eq!((role(&s), epoch(&s)), ("active", epoch3), "{}", p.logs());
    drop(p);
}

impl Drop for Pair {
    fn drop(&mut self) {
        for (_, p, _) in &mut self.agents {
            p.kill9();
        }
        self.host.kill9();
        self.etcd.kill9();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn pair_sync_loss_and_etcd_loss_leave_no_second_active() {
    if !is_root() {
        println!("SKIP: needs root (EAL, namespaces)");
        return;
    }
    let p = Pair::start("p");
    let long = Duration::from_secs(60);
    let mut current = None;
    eventually(
        "one active, one Ready standby",
        long,
        || {
            current = settled(&p);
            current.is_some()
        },
        || format!("{:?}\n{}", p.pair_states(), p.logs()),
    );
    let (active, epoch1) = current.unwrap();
    let standby = if active == "pa" { "pb" } else { "pa" };

    // The sync link cut (both members' sync ports): the standby goes NotReady; nobody moves.
    p.cut("sync", &[p.sync_ports.0, p.sync_ports.1]);
    eventually(
        "the standby NotReady without its sync link",
        Duration::from_secs(20),
        || p.state(standby)["ready"] == Value::Bool(false),
        || format!("{:?}\n{}", p.pair_states(), p.logs()),
    );
    let (a, s) = (p.state(&active), p.state(standby));
    assert_eq!((role(&a), epoch(&a)), ("active", epoch1), "{a} {s}");
    assert_eq!(role(&s), "standby", "{s}");
    p.heal("sync");
    eventually(
        "the standby Ready again once the link is back",
        long,
        || settled(&p) == Some((active.clone(), epoch1)),
        || format!("{:?}\n{}", p.pair_states(), p.logs()),
    );

    // The host agent cut off from etcd: no renewal reaches the DPU, the active fences itself;
    // the standby cannot be elected either. Never two actives, never a lower epoch. (Watched
    // through the metrics: `dpuctl dpus` reads the DPU records from etcd.)
    p.cut("etcd", &[p.etcd_port]);
    eventually(
        "the active fenced without etcd",
        Duration::from_secs(20),
        || p.metric_role(&active) == Some(2),
        || format!("{:?}\n{}", p.metric_role(&active), p.logs()),
    );
    for _ in 0..10 {
        let roles = (p.metric_role("pa"), p.metric_role("pb"));
        assert!(
            roles.0 != Some(1) && roles.1 != Some(1),
            "an active without etcd: {roles:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    p.heal("etcd");
    let mut after = None;
    eventually(
        "one active and one Ready standby once etcd is back",
        long,
        || {
            after = settled(&p);
            after.is_some()
        },
        || format!("{:?}\n{}", p.pair_states(), p.logs()),
    );
    let (holder, epoch2) = after.unwrap();
    assert!(epoch2 >= epoch1, "epoch went back: {epoch2} < {epoch1}");

    // A planned switchover: the other member takes over in a newer epoch, and the old one is
    // a Ready standby again.
    let out = in_ns(&p.ns, bin("dpuctl"))
        .args(["--server", &p.api, "--json", "dpu", "switchover"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "switchover: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.logs()
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("planned switchover: {r}");
    let other = if holder == "pa" { "pb" } else { "pa" };
    assert_eq!(r["from"], holder.as_str(), "{r}");
    assert_eq!(r["to"], other, "{r}");
    assert!(r["epoch"].as_u64().unwrap() > epoch2, "{r}");
    eventually(
        "the old active a Ready standby of the new one",
        long,
        || settled(&p).is_some_and(|(a, e)| a == other && e == r["epoch"].as_u64().unwrap()),
        || format!("{:?}\n{}", p.pair_states(), p.logs()),
    );
    // Refused while the standby cannot be Ready: with the sync link cut.
    p.cut("sync2", &[p.sync_ports.0, p.sync_ports.1]);
    eventually(
        "the standby NotReady again",
        Duration::from_secs(20),
        || p.state(&holder)["ready"] == Value::Bool(false),
        || format!("{:?}\n{}", p.pair_states(), p.logs()),
    );
    let out = in_ns(&p.ns, bin("dpuctl"))
        .args(["--server", &p.api, "dpu", "switchover"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not Ready"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.heal("sync2");
}
