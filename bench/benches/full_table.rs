#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! A full table through FRR 10.3 and the agents, against zebra alone, in one run.
//!
//! ```text
//! cargo build --release -p host-agent -p dpu-agent --bins
//! cargo bench -p bench --bench full_table                       # FULL_TABLE_ROUTES=1000000
//! ```
//!
//! A BGP speaker written here (in namespace S) announces N /24s to bgpd (FRR 10.3 from the
//! Debian 13 chroot, in namespace R); zebra (`-M dplane_fpm_nl`, `--asic-offload=
//! notify_on_offload`) streams them over FPM.
//! - `zebra_alone`: FPM goes to a sink here that decodes every frame. The time runs from the
//!   first UPDATE sent until the sink has seen all N routes.
//! - `through_agents`: FPM goes to the `host-agent` binary (with etcd), which pushes the routes
//!   to a `dpu-agent` binary with `[nic] backend = "reference"` (profile full, net_null port).
//!   The time runs from the first UPDATE until zebra counts all N routes offloaded
//!   (`show ip route summary json`), i.e. acknowledged back over FPM. A poll of zebra walks
//!   its table (about 10 ms of zebra's CPU at 100k routes), so the bench first watches the host
//!   agent's `dpucp_fpm_feedback_total` (every 5 ms, cheap) until N more statuses went to zebra,
//!   and only then polls zebra, every 5 ms, until it counts them all.
//!
//! Between iterations the session is closed and the bench waits for zebra to drop the routes.
//!
//! Beside the wall time, each mode prints the CPU time every process spent per iteration
//! (`/proc/PID/stat`, from the first UPDATE to the end condition): where the time goes.
//! Needs root, the chroot (`scripts/frr-chroot`) and `etcd`; it says what is missing.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use host_agent::fpm::{decode_netlink, DecodeStats, FpmEvent, FrameDecoder};

const CHROOT: &str = "/var/cache/dpucp/frr-trixie";
const FPM_PORT: u16 = 2620;
const BGP_PROTO: u8 = 186;

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn routes_wanted() -> u32 {
    std::env::var("FULL_TABLE_ROUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// The N /24s: 20.0.0.0/24 upwards.
fn prefix(i: u32) -> [u8; 3] {
    let a = 0x1400_0000u32 + (i << 8);
    let b = a.to_be_bytes();
    [b[0], b[1], b[2]]
}

// ------------------------------------------------------------------------------------------
// A minimal BGP speaker: OPEN (4-byte AS, IPv4 unicast), KEEPALIVE, UPDATEs of /24s.

const MY_AS: u32 = 65100;
const NEXT_HOP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

fn bgp_msg(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&u16::try_from(19 + body.len()).unwrap().to_be_bytes());
    m.push(kind);
    m.extend_from_slice(body);
    m
}

fn open_msg() -> Vec<u8> {
    let mut b = vec![4];
    b.extend_from_slice(&u16::try_from(MY_AS).unwrap().to_be_bytes());
    b.extend_from_slice(&180u16.to_be_bytes());
    b.extend_from_slice(&NEXT_HOP.octets());
    let caps: Vec<u8> = [
        &[1u8, 4, 0, 1, 0, 1][..], // IPv4 unicast
        &[65, 4, 0, 0, (MY_AS >> 8) as u8, (MY_AS & 0xff) as u8][..], // 4-byte AS
    ]
    .concat();
    b.push(u8::try_from(caps.len() + 2).unwrap());
    b.push(2);
    b.push(u8::try_from(caps.len()).unwrap());
    b.extend_from_slice(&caps);
    bgp_msg(1, &b)
}

/// UPDATEs announcing prefixes `0..n`, as many per message as fit in 4096 bytes.
fn updates(n: u32) -> Vec<Vec<u8>> {
    let mut attrs = vec![0x40, 1, 1, 0]; // ORIGIN IGP
    attrs.extend_from_slice(&[0x40, 2, 6, 2, 1]); // AS_PATH: one AS_SEQUENCE of one AS
    attrs.extend_from_slice(&MY_AS.to_be_bytes());
    attrs.extend_from_slice(&[0x40, 3, 4]); // NEXT_HOP
    attrs.extend_from_slice(&NEXT_HOP.octets());
    let per = (4096 - 19 - 4 - attrs.len()) / 4;
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let mut b = vec![0, 0];
        b.extend_from_slice(&u16::try_from(attrs.len()).unwrap().to_be_bytes());
        b.extend_from_slice(&attrs);
        for _ in 0..per {
            if i == n {
                break;
            }
            b.push(24);
            b.extend_from_slice(&prefix(i));
            i += 1;
        }
        out.push(bgp_msg(2, &b));
    }
    out
}

/// An established session; closing it makes bgpd withdraw everything.
struct Session {
    stream: TcpStream,
    drain: Option<std::thread::JoinHandle<()>>,
}

impl Session {
    /// Connects from namespace `ns` to bgpd and completes the OPEN exchange (bounded).
    fn open(ns: &str) -> Session {
        let ns_file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        let stream = std::thread::spawn(move || {
            nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                if let Ok(s) = Self::try_open() {
                    return s;
                }
                assert!(Instant::now() < deadline, "no BGP session with bgpd");
                std::thread::sleep(Duration::from_millis(500));
            }
        })
        .join()
        .unwrap();
        let mut r = stream.try_clone().unwrap();
        // Whatever bgpd sends (keepalives) is read and dropped, so it never blocks.
        let drain = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
        });
        Session {
            stream,
            drain: Some(drain),
        }
    }

    fn try_open() -> std::io::Result<TcpStream> {
        let addr: SocketAddr = "10.9.0.1:179".parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&open_msg())?;
        // Read until bgpd's OPEN and KEEPALIVE (types 1 then 4); answer its OPEN.
        let mut got_open = false;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::other("bgpd closed the session"));
            }
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 19 {
                let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
                if buf.len() < len {
                    break;
                }
                let kind = buf[18];
                buf.drain(..len);
                match kind {
                    1 => {
                        got_open = true;
                        s.write_all(&bgp_msg(4, &[]))?;
                    }
                    4 if got_open => {
                        s.set_read_timeout(None)?;
                        return Ok(s);
                    }
                    3 => return Err(std::io::Error::other("NOTIFICATION from bgpd")),
                    _ => {}
                }
            }
        }
    }

    fn send_all(&mut self, msgs: &[Vec<u8>]) {
        for (i, m) in msgs.iter().enumerate() {
            self.stream.write_all(m).unwrap();
            if i % 256 == 255 {
                self.stream.write_all(&bgp_msg(4, &[])).unwrap();
            }
        }
    }

    fn keepalive(&mut self) {
        let _ = self.stream.write_all(&bgp_msg(4, &[]));
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
    }
}

// ------------------------------------------------------------------------------------------
// The lab: namespaces R (FRR, agents) and S (the speaker), FRR from the chroot.

struct Lab {
    r: String,
    s: String,
    dir: String,
    children: Vec<Child>,
    frr_pids: Vec<PathBuf>,
    /// Processes whose CPU time is reported, by name.
    named: Vec<(String, u32)>,
}

/// CPU seconds (user + system) of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (t(11) + t(12)) as f64 / 100.0 // utime + stime, 100 Hz ticks
}

/// CPU time per process over the measured part of each iteration.
struct CpuMeter {
    procs: Vec<(String, u32)>,
    spent: Vec<f64>,
    wall: Duration,
    iterations: u32,
}

impl CpuMeter {
    fn new(procs: Vec<(String, u32)>) -> CpuMeter {
        let spent = vec![0.0; procs.len()];
        CpuMeter {
            procs,
            spent,
            wall: Duration::ZERO,
            iterations: 0,
        }
    }

    fn now(&self) -> Vec<f64> {
        self.procs.iter().map(|(_, p)| cpu_secs(*p)).collect()
    }

    fn add(&mut self, before: &[f64], wall: Duration) {
        for (i, b) in before.iter().enumerate() {
            self.spent[i] += cpu_secs(self.procs[i].1) - b;
        }
        self.wall += wall;
        self.iterations += 1;
    }

    fn report(&self, label: &str) {
        let n = f64::from(self.iterations.max(1));
        let mut parts = vec![format!(
            "wall {:.0} ms",
            self.wall.as_secs_f64() * 1000.0 / n
        )];
        for (i, (name, _)) in self.procs.iter().enumerate() {
            parts.push(format!("{name} {:.0} ms", self.spent[i] * 1000.0 / n));
        }
        let total: f64 = self.spent.iter().sum();
        parts.push(format!("all {:.0} ms", total * 1000.0 / n));
        eprintln!(
            "full_table cpu per iteration, {label} ({} iterations): {}",
            self.iterations,
            parts.join(", ")
        );
    }
}

impl Lab {
    fn start() -> Lab {
        let tag = std::process::id();
        let (r, s) = (format!("ftb-r{tag}"), format!("ftb-s{tag}"));
        for n in [&r, &s] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "link", "add", "v0", "netns", &r, "type", "veth", "peer", "name", "v1", "netns",
            &s,
        ]);
        sh(&["ip", "-n", &r, "addr", "add", "10.9.0.1/24", "dev", "v0"]);
        sh(&["ip", "-n", &s, "addr", "add", "10.9.0.2/24", "dev", "v1"]);
        sh(&["ip", "-n", &r, "link", "set", "v0", "up"]);
        sh(&["ip", "-n", &s, "link", "set", "v1", "up"]);
        let dir = format!("/tmp/ftb-{tag}");
        let lab = Lab {
            r,
            s,
            dir,
            children: Vec::new(),
            frr_pids: Vec::new(),
            named: Vec::new(),
        };
        lab.start_frr()
    }

    fn start_frr(mut self) -> Lab {
        let host_dir = Path::new(CHROOT).join(self.dir.trim_start_matches('/'));
        std::fs::create_dir_all(&host_dir).unwrap();
        let passwd = std::fs::read_to_string(Path::new(CHROOT).join("etc/passwd")).unwrap();
        let ids: Vec<u32> = passwd
            .lines()
            .find(|l| l.starts_with("frr:"))
            .map(|l| {
                l.split(':')
                    .skip(2)
                    .take(2)
                    .map(|x| x.parse().unwrap())
                    .collect()
            })
            .unwrap();
        let run = Path::new(CHROOT).join("run/frr/ftb");
        std::fs::create_dir_all(&run).unwrap();
        for p in [&host_dir, &run, &Path::new(CHROOT).join("run/frr")] {
            std::os::unix::fs::chown(p, Some(ids[0]), Some(ids[1])).unwrap();
        }
        for d in ["mgmtd", "zebra", "bgpd"] {
            let mut args = vec![
                "netns".to_owned(),
                "exec".into(),
                self.r.clone(),
                "chroot".into(),
                CHROOT.into(),
                format!("/usr/lib/frr/{d}"),
                "-N".into(),
                "ftb".into(),
                "-i".into(),
                format!("{}/{d}.pid", self.dir),
                "--log".into(),
                format!("file:{}/{d}.log", self.dir),
                "-d".into(),
            ];
            if d == "zebra" {
                args.extend(
                    [
                        "-R",
                        "0",
                        "-M",
                        "dplane_fpm_nl",
                        "--asic-offload=notify_on_offload",
                    ]
                    .map(String::from),
                );
            }
            let st = Command::new("ip")
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "{d} did not start");
            self.frr_pids.push(host_dir.join(format!("{d}.pid")));
            std::thread::sleep(Duration::from_millis(500));
            if d != "mgmtd" {
                if let Some(pid) = std::fs::read_to_string(host_dir.join(format!("{d}.pid")))
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
                {
                    self.named.push((d.to_owned(), pid));
                }
            }
        }
        let conf = format!(
            "fpm address 127.0.0.1 port {FPM_PORT}\n\
             router bgp 65000\n bgp router-id 10.9.0.1\n no bgp ebgp-requires-policy\n\
             neighbor 10.9.0.2 remote-as {MY_AS}\n neighbor 10.9.0.2 timers connect 1\n\
             exit\n"
        );
        std::fs::write(host_dir.join("frr.conf"), conf).unwrap();
        let _ = self.vtysh(&["-f", &format!("{}/frr.conf", self.dir)]);
        self
    }

    fn vtysh(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.r, "chroot", CHROOT, "vtysh", "-N", "ftb",
            ])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// (BGP routes in zebra's RIB, of them acknowledged as offloaded).
    fn bgp_counts(&self) -> (u64, u64) {
        let out = self.vtysh(&["-c", "show ip route summary json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let mut c = (0, 0);
        for r in v["routes"].as_array().into_iter().flatten() {
            if r["type"] == "ebgp" {
                c.0 += r["rib"].as_u64().unwrap_or(0);
                c.1 += r["fibOffLoaded"].as_u64().unwrap_or(0);
            }
        }
        c
    }

    fn wait_empty(&self) {
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.bgp_counts().0 != 0 {
            assert!(Instant::now() < deadline, "zebra did not drop the routes");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Spawns a process in namespace R; stopped by PID when the lab goes.
    fn spawn(&mut self, program: &Path, args: &[&str], log: &Path) -> u32 {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.r])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        for p in &self.frr_pids {
            if let Ok(pid) = std::fs::read_to_string(p) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        for n in [&self.r, &self.s] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

// ------------------------------------------------------------------------------------------
// The FPM sink for "zebra alone".

struct Sink {
    seen: Arc<AtomicU64>,
    deleted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Sink {
    /// Listens on the FPM port in namespace R and counts BGP route adds and deletes.
    fn start(ns: &str) -> Sink {
        let seen = Arc::new(AtomicU64::new(0));
        let deleted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, d2, st2) = (seen.clone(), deleted.clone(), stop.clone());
        let ns_file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = TcpListener::bind(("127.0.0.1", FPM_PORT)).unwrap();
            l.set_nonblocking(true).unwrap();
            while !st2.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut d = FrameDecoder::new();
                let mut st = DecodeStats::default();
                let mut events = Vec::with_capacity(4096);
                let mut buf = vec![0u8; 1 << 16];
                while !st2.load(Ordering::Relaxed) {
                    match c.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => d.extend(&buf[..n]),
                        Err(_) => continue,
                    }
                    while let Ok(Some(f)) = d.next_frame() {
                        decode_netlink(f, &mut events, &mut st);
                    }
                    for e in events.drain(..) {
                        match e {
                            FpmEvent::Route(r) if r.protocol == BGP_PROTO => {
                                s2.fetch_add(1, Ordering::Relaxed);
                            }
                            FpmEvent::RouteDeleted(_) => {
                                d2.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
        Sink {
            seen,
            deleted,
            stop,
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
    }
}

// ------------------------------------------------------------------------------------------
// The agents for "through agents".

fn free_port(ns_file: &std::fs::File) -> u16 {
    let f = ns_file.try_clone().unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
    .join()
    .unwrap()
}

/// The value of an unlabelled metric on the host agent's Prometheus endpoint (in namespace R).
fn metric(ns_file: &std::fs::File, port: u16, name: &str) -> f64 {
    let f = ns_file.try_clone().unwrap();
    let name = name.to_owned();
    std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return 0.0;
        };
        let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    })
    .join()
    .unwrap()
}

/// Starts etcd, the DPU agent and the host agent; returns the host agent's metrics port.
fn start_agents(lab: &mut Lab, n: u32) -> u16 {
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    for b in ["host-agent", "dpu-agent", "dpuctl"] {
        assert!(
            bin.join(b).exists(),
            "no {}: cargo build --release -p host-agent -p dpu-agent --bins",
            bin.join(b).display()
        );
    }
    let ns_file = std::fs::File::open(format!("/run/netns/{}", lab.r)).unwrap();
    let port = || free_port(&ns_file);
    let dir = PathBuf::from(&lab.dir);
    let work = Path::new(CHROOT).join(lab.dir.trim_start_matches('/'));
    let (etcd_c, etcd_p, api, metrics, link) = (port(), port(), port(), port(), port());
    let etcd_url = format!("http://127.0.0.1:{etcd_c}");
    let peer = format!("http://127.0.0.1:{etcd_p}");
    let data = work.join("etcd");
    let etcd_pid = lab.spawn(
        Path::new("/usr/bin/etcd"),
        &[
            "--name",
            "f",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &etcd_url,
            "--advertise-client-urls",
            &etcd_url,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("f={peer}"),
            "--log-level",
            "error",
            "--logger",
            "zap",
        ],
        &work.join("etcd.log"),
    );
    let dpu_cfg = work.join("dpu-agent.toml");
    std::fs::write(
        &dpu_cfg,
        format!(
            "dpu_id = \"dpu-ft\"\n[eal]\nargs = [\"-l\", \"0\", \"--no-huge\", \"--no-pci\", \"--no-shconf\", \"-m\", \"1024\", \"--log-level=*:warning\"]\n[[ports]]\nname = \"net_null0\"\ndevice = \"net_null0,no-rx=1\"\nrole = \"uplink\"\n[lcores]\nforwarding = 1\n[link]\nlisten = \"127.0.0.1:{link}\"\n[limits]\nmax_routes = {}\n[nic]\nbackend = \"reference\"\nprofile = \"full\"\nmax_rules = {}\n",
            (n * 2).max(1 << 20),
            n * 2 + 1024
        ),
    )
    .unwrap();
    let dpu_pid = lab.spawn(
        &bin.join("dpu-agent"),
        &["--config", dpu_cfg.to_str().unwrap()],
        &work.join("dpu-agent.log"),
    );
    let host_cfg = work.join("host-agent.toml");
    std::fs::write(
        &host_cfg,
        format!(
            "[etcd]\nendpoints = [\"{etcd_url}\"]\n[api]\nlisten = \"127.0.0.1:{api}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[fpm]\nlisten = \"127.0.0.1:{FPM_PORT}\"\ntable_encoding = \"main-as-zero\"\ninterfaces = {{ v0 = 0 }}\nneighbours = {{ \"10.9.0.2\" = \"02:00:00:00:00:02\" }}\n[[dpus]]\nid = \"dpu-ft\"\nlink = \"127.0.0.1:{link}\"\n"
        ),
    )
    .unwrap();
    let host_pid = lab.spawn(
        &bin.join("host-agent"),
        &["--config", host_cfg.to_str().unwrap()],
        &work.join("host-agent.log"),
    );
    lab.named.push(("host-agent".into(), host_pid));
    lab.named.push(("dpu-agent".into(), dpu_pid));
    lab.named.push(("etcd".into(), etcd_pid));
    // The node, through dpuctl, once the API answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = Command::new("ip")
            .args(["netns", "exec", &lab.r])
            .arg(bin.join("dpuctl"))
            .args([
                "--server",
                &format!("http://127.0.0.1:{api}"),
                "node",
                "set",
                "--vtep",
                "192.0.2.1",
                "--router-mac",
                "02:00:00:00:00:01",
                "--uplink",
                "0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if st.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host agent API not up; see {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    metrics
}

fn bench(c: &mut Criterion) {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root || !Path::new(CHROOT).join("usr/lib/frr/zebra").exists() {
        eprintln!("full_table: skipped (needs root and the FRR 10.3 chroot: scripts/frr-chroot)");
        return;
    }
    let n = routes_wanted();
    let msgs = updates(n);
    eprintln!("full_table: {n} routes in {} UPDATEs", msgs.len());
    let mut lab = Lab::start();
    let mut g = c.benchmark_group("full_table");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));

    {
        let sink = Sink::start(&lab.r);
        let mut procs = lab.named.clone();
        procs.push(("bench (speaker, sink)".into(), std::process::id()));
        let mut meter = CpuMeter::new(procs);
        g.bench_function(format!("zebra_alone/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let base = sink.seen.load(Ordering::Relaxed);
                    let del = sink.deleted.load(Ordering::Relaxed);
                    let mut s = Session::open(&lab.s);
                    let before = meter.now();
                    let t0 = Instant::now();
                    s.send_all(&msgs);
                    let deadline = Instant::now() + Duration::from_secs(600);
                    while sink.seen.load(Ordering::Relaxed) < base + u64::from(n) {
                        assert!(Instant::now() < deadline, "sink did not see every route");
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    total += t0.elapsed();
                    meter.add(&before, t0.elapsed());
                    drop(s);
                    while sink.deleted.load(Ordering::Relaxed) < del + u64::from(n) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    lab.wait_empty();
                }
                total
            })
        });
        meter.report("zebra alone");
    }
    // zebra reconnects to the host agent on the same port within its 3 s retry.
    let metrics_port = start_agents(&mut lab, n);
    let ns_file = std::fs::File::open(format!("/run/netns/{}", lab.r)).unwrap();
    let feedback = || metric(&ns_file, metrics_port, "dpucp_fpm_feedback_total");
    let mut procs = lab.named.clone();
    procs.push(("bench (speaker, polls)".into(), std::process::id()));
    let mut meter = CpuMeter::new(procs);
    g.bench_function(format!("through_agents/{n}"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut s = Session::open(&lab.s);
                let fed = feedback();
                let before = meter.now();
                let t0 = Instant::now();
                s.send_all(&msgs);
                let deadline = Instant::now() + Duration::from_secs(1200);
                let mut last_ka = Instant::now();
                // Cheap first: the host agent has sent N statuses to zebra.
                while feedback() < fed + f64::from(n) {
                    assert!(Instant::now() < deadline, "not every route acknowledged");
                    if last_ka.elapsed() > Duration::from_secs(20) {
                        s.keepalive();
                        last_ka = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                loop {
                    let (_, off) = lab.bgp_counts();
                    if off >= u64::from(n) {
                        break;
                    }
                    assert!(Instant::now() < deadline, "not every route acknowledged");
                    if last_ka.elapsed() > Duration::from_secs(20) {
                        s.keepalive();
                        last_ka = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                total += t0.elapsed();
                meter.add(&before, t0.elapsed());
                drop(s);
                lab.wait_empty();
            }
            total
        })
    });
    meter.report("through the agents");
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
