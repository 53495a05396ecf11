//! Test harness for real FRR: a network namespace per test, FRR daemons started inside it
//! (from the host or from the Debian 13 chroot built by `scripts/frr-chroot`), stopped by PID.
//!
//! The FPM server must listen inside the namespace zebra runs in. Entering a namespace needs
//! `setns`, which this crate (no unsafe) does not call: instead the test re-runs its own
//! binary under `ip netns exec` for just that test, and the inner run does the work.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use host_agent::fpm::{FpmConfig, FpmEvent, FpmServer, Rib, ServerEvent, StaticAttribution};
use tokio::sync::mpsc;

/// Environment variable telling the inner run which namespace it is in.
pub const NETNS_ENV: &str = "DPUCP_FPM_NETNS";
/// Environment variable carrying the FRR chroot's path to the inner run.
pub const CHROOT_ENV: &str = "DPUCP_FRR_CHROOT";

fn sh(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"))
}

fn sh_ok(cmd: &str, args: &[&str]) {
    let o = sh(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A network namespace with `lo` up and a veth pair `v0` (10.0.0.2/24, fd00::2/64) /
/// `v1` (10.0.1.2/24). Deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("dpucp-{tag}-{}-{n}", std::process::id());
        let _ = sh("ip", &["netns", "del", &name]);
        sh_ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        let n = ns.name.as_str();
        sh_ok("ip", &["-n", n, "link", "set", "lo", "up"]);
        sh_ok(
            "ip",
            &[
                "-n", n, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
            ],
        );
        sh_ok("ip", &["-n", n, "addr", "add", "10.0.0.2/24", "dev", "v0"]);
        sh_ok(
            "ip",
            &["-n", n, "addr", "add", "fd00::2/64", "dev", "v0", "nodad"],
        );
        sh_ok("ip", &["-n", n, "addr", "add", "10.0.1.2/24", "dev", "v1"]);
        sh_ok("ip", &["-n", n, "link", "set", "v0", "up"]);
        sh_ok("ip", &["-n", n, "link", "set", "v1", "up"]);
        ns
    }

    /// Re-run `test` of the current test binary inside the namespace, bounded by `limit`.
    /// Panics (failing the outer test) if the inner run fails or times out.
    pub fn run_inner(&self, test: &str, limit: Duration, extra_env: &[(&str, &str)]) {
        self.run_inner_at(Path::new("/"), test, limit, extra_env)
    }

    /// As [`Netns::run_inner`]; on timeout also stops the daemons the inner run started under
    /// `root` (their pid files name them).
    pub fn run_inner_at(
        &self,
        root: &Path,
        test: &str,
        limit: Duration,
        extra_env: &[(&str, &str)],
    ) {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(&exe)
            .args([test, "--exact", "--nocapture", "--test-threads", "1"])
            .env(NETNS_ENV, &self.name);
        // The inner run's output (its own "test result" line included) is shown only on
        // failure, so test summaries count each test once.
        let log_path = std::env::temp_dir().join(format!("{}.log", self.name));
        let log = std::fs::File::create(&log_path).unwrap();
        cmd.stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        let show = || std::fs::read_to_string(&log_path).unwrap_or_default();
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "inner run of {test} failed: {status}\n{}",
                    show()
                );
                let _ = std::fs::remove_file(&log_path);
                return;
            }
            if Instant::now() > deadline {
                let _ = sh("kill", &["-9", &child.id().to_string()]);
                let _ = child.wait();
                kill_pid_files(&root.join(format!("tmp/dpucp-fpm-{}", self.name)));
                panic!("inner run of {test} timed out after {limit:?}\n{}", show());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn kill_pid_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.path().extension().is_some_and(|x| x == "pid") {
            if let Ok(pid) = std::fs::read_to_string(e.path()) {
                let _ = sh("kill", &["-9", pid.trim()]);
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// The namespace this process was re-run in, if it is the inner run.
pub fn inner_netns() -> Option<String> {
    std::env::var(NETNS_ENV).ok()
}

/// uid and gid of user `frr` in the passwd file under `root`.
fn frr_ids(root: &Path) -> (u32, u32) {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.first() == Some(&"frr") && f.len() > 3 {
            return (f[2].parse().unwrap(), f[3].parse().unwrap());
        }
    }
    panic!("no frr user in {}", root.display());
}

/// FRR daemons in one pathspace, run from the host (`root` = "/") or a chroot.
pub struct Frr {
    /// The filesystem root FRR runs in.
    pub root: PathBuf,
    /// The pathspace (`-N`).
    pub ns: String,
    /// Working directory as FRR sees it (pid files, logs, configs).
    pub dir: String,
    /// Another namespace to run in (`ip netns exec`), if not this process's.
    pub netns: Option<String>,
    pids: Vec<(String, u32)>,
}

impl Frr {
    pub fn new(root: &Path, ns: &str) -> Frr {
        let (uid, gid) = frr_ids(root);
        let dir = format!("/tmp/dpucp-fpm-{ns}");
        let host_dir = root.join(dir.trim_start_matches('/'));
        let _ = std::fs::remove_dir_all(&host_dir);
        std::fs::create_dir_all(&host_dir).unwrap();
        std::os::unix::fs::chown(&host_dir, Some(uid), Some(gid)).unwrap();
        let run = root.join("run/frr").join(ns);
        std::fs::create_dir_all(&run).unwrap();
        std::os::unix::fs::chown(root.join("run/frr"), Some(uid), Some(gid)).unwrap();
        std::os::unix::fs::chown(&run, Some(uid), Some(gid)).unwrap();
        Frr {
            root: root.to_path_buf(),
            ns: ns.to_string(),
            dir,
            netns: None,
            pids: Vec::new(),
        }
    }

    /// As [`Frr::new`], running the daemons in namespace `netns`.
    pub fn in_netns(root: &Path, ns: &str, netns: &str) -> Frr {
        let mut f = Frr::new(root, ns);
        f.netns = Some(netns.to_string());
        f
    }

    fn command(&self, program: &str) -> Command {
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(n) = &self.netns {
            argv.extend(["ip", "netns", "exec", n.as_str()].map(Into::into));
        }
        if self.root != Path::new("/") {
            argv.push("chroot".into());
            argv.push(self.root.clone().into_os_string());
        }
        argv.push(program.into());
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    }

    /// Path of a file in the working directory, as the test sees it.
    pub fn host_path(&self, name: &str) -> PathBuf {
        self.root.join(self.dir.trim_start_matches('/')).join(name)
    }

    /// Write a file into the working directory (readable by FRR); returns FRR's path to it.
    pub fn write(&self, name: &str, text: &str) -> String {
        std::fs::write(self.host_path(name), text).unwrap();
        format!("{}/{name}", self.dir)
    }

    /// Start a daemon (`-d`, pid file and log in the working directory) and remember its PID.
    pub fn start(&mut self, daemon: &str, extra: &[&str]) {
        let pid_file = format!("{}/{daemon}.pid", self.dir);
        let log = format!("file:{}/{daemon}.log", self.dir);
        // Daemonised FRR 10 keeps inherited descriptors open: never give it a pipe.
        let err_path = self.host_path(&format!("{daemon}.stderr"));
        let err = std::fs::File::create(&err_path).unwrap();
        let status = self
            .command(&format!("/usr/lib/frr/{daemon}"))
            .args(["-N", &self.ns, "-i", &pid_file, "--log", &log, "-d"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{daemon}: {status} {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        let host_pid = self.host_path(&format!("{daemon}.pid"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(p) = std::fs::read_to_string(&host_pid)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "{daemon} wrote no pid file");
            std::thread::sleep(Duration::from_millis(50));
        };
        self.pids.push((daemon.to_string(), pid));
    }

    /// Run vtysh with `-c` commands (or other arguments); returns stdout.
    pub fn vtysh(&self, args: &[&str]) -> String {
        let out = self
            .command("vtysh")
            .args(["-N", &self.ns])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Configure with `vtysh -f` (FRR 10 daemons take no `-f`).
    pub fn load_config(&self, name: &str, text: &str) {
        let path = self.write(name, text);
        let out = self
            .command("vtysh")
            .args(["-N", &self.ns, "-f", &path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vtysh -f: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `zebra --version` output.
    pub fn zebra_version(&self) -> String {
        let out = self
            .command("/usr/lib/frr/zebra")
            .arg("--version")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The log of a daemon (for failure messages).
    pub fn log(&self, daemon: &str) -> String {
        std::fs::read_to_string(self.host_path(&format!("{daemon}.log"))).unwrap_or_default()
    }

    /// Stop every daemon started, by PID, last first.
    pub fn stop(&mut self) {
        while let Some((_, pid)) = self.pids.pop() {
            let p = pid.to_string();
            let _ = sh("kill", &[&p]);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sh("kill", &["-9", &p]);
            }
        }
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.root.join("run/frr").join(&self.ns));
        // Logs stay for a failing test to be read.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(self.root.join(self.dir.trim_start_matches('/')));
        }
    }
}

/// The ifindex of an interface of this namespace.
pub fn ifindex(dev: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// An attribution for the namespace: zebra tables `tables` are the underlay, v0/v1 are DPU
/// ports 0/1, every gateway has one MAC.
pub fn attribution(tables: &[u32]) -> StaticAttribution {
    let mut a = StaticAttribution {
        default_mac: Some(flow_offload::model::MacAddr([0x02, 0, 0, 0, 0, 1])),
        ..Default::default()
    };
    for t in tables {
        a.tables.insert(*t, flow_offload::model::TableId(254));
    }
    a.ports
        .insert(ifindex("v0"), flow_offload::model::PortId(0));
    a.ports
        .insert(ifindex("v1"), flow_offload::model::PortId(1));
    a
}

/// Start an FPM server on 127.0.0.1:2620 of this namespace.
pub async fn server(
    feedback: host_agent::fpm::FeedbackEncoder,
) -> (FpmServer, mpsc::Receiver<ServerEvent>) {
    FpmServer::start(FpmConfig {
        feedback,
        ..FpmConfig::default()
    })
    .await
    .unwrap()
}

/// Receive server events until `done` says so or `limit` passes; every event is applied to
/// `rib` and returned.
pub async fn collect(
    rx: &mut mpsc::Receiver<ServerEvent>,
    limit: Duration,
    mut done: impl FnMut(&[FpmEvent]) -> bool,
) -> Vec<FpmEvent> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut all = Vec::new();
    loop {
        if done(&all) {
            return all;
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ServerEvent::Events(evs))) => all.extend(evs),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return all,
        }
    }
}

/// Whether `events` contain an add of `prefix`.
pub fn has_route(events: &[FpmEvent], prefix: &str) -> bool {
    let p: flow_offload::model::Prefix = prefix.parse().unwrap();
    events
        .iter()
        .any(|e| matches!(e, FpmEvent::Route(r) if r.prefix == p))
}

/// Apply events to a RIB and return the model changes.
pub fn to_changes(
    rib: &mut Rib,
    attr: &StaticAttribution,
    events: &[FpmEvent],
) -> Vec<flow_offload::model::Change> {
    let mut b = host_agent::fpm::ChangeBatch::new();
    rib.apply_all(events, attr, &mut b);
    b.take()
}
