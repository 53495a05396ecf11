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
//! Traffic through the pair (NAT sessions surviving the failover) needs TAP ports and the lab;
//! see `lab_e2e.rs`. Needs root (EAL) and etcd; run by `scripts/test` after the binaries are
//! built.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, eventually, free_port, is_root, Proc};
use serde_json::Value;

struct Pair {
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

impl Pair {
    fn start() -> Pair {
        let dir = std::env::temp_dir().join(format!("dpucp-pair-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (client, peer) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let etcd = Proc::spawn(
            Command::new(std::env::var("ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".into()))
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
        let host_cfg = format!(
            "[etcd]\nendpoints = [\"{etcd_url}\"]\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n\
             [[dpus]]\nid = \"pa\"\nlink = \"127.0.0.1:{link_a}\"\npair = {{ group = \"site-a\", member = \"a\" }}\n\
             [[dpus]]\nid = \"pb\"\nlink = \"127.0.0.1:{link_b}\"\npair = {{ group = \"site-a\", member = \"b\" }}\n",
            free_port()
        );
        std::fs::write(dir.join("host-agent.toml"), host_cfg).unwrap();
        let host = Proc::spawn(
            Command::new(bin("host-agent"))
                .arg("--config")
                .arg(dir.join("host-agent.toml"))
                .env("RUST_LOG", "info"),
            dir.join("host-agent.log"),
        );
        let mut me = Pair {
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
            Command::new(bin("dpu-agent"))
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
        let o = Command::new(bin("dpuctl"))
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
    let mut p = Pair::start();
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
