//! Harness for tests that run the real `dpu-agent` binary on DPDK `net_tap` ports whose kernel
//! interfaces are moved into network namespaces acting as hosts, with the host link driven
//! from the test. Everything started is stopped by PID; namespaces are deleted on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use flow_offload::model::{Change, MacAddr};
use flow_offload::wire::frame::{FrameCodec, FrameReader};
use flow_offload::wire::{Apply, Features, Hello, HostHello, Message, PROTOCOL_VERSION};

/// Whether this process can run the tests (root, /dev/net/tun).
pub fn can_run() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let tun = Path::new("/dev/net/tun").exists();
    if !root || !tun {
        println!("SKIP: needs root and /dev/net/tun (root={root}, tun={tun})");
    }
    root && tun
}

/// A short tag unique to this process and test, for interface and namespace names (≤ 15
/// characters with prefixes).
pub fn tag(test: &str) -> String {
    // FNV-1a of the test name, so two tests never share names.
    let h = test.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{:03x}{:04x}", h & 0xfff, std::process::id() & 0xffff)
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        sh(&["ip", "netns", "add", name]);
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
        Netns {
            name: name.to_owned(),
        }
    }

    /// `ip -n NS ...`
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Starts a command inside the namespace.
    pub fn spawn(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Moves a root-namespace interface here and brings it up.
    pub fn take(&self, iface: &str) {
        sh(&["ip", "link", "set", iface, "netns", &self.name]);
        self.ip(&["link", "set", iface, "up"]);
    }

    /// The MAC address of an interface here.
    pub fn mac(&self, iface: &str) -> MacAddr {
        let out = self.ip(&["-br", "link", "show", iface]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text
            .split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no mac in {text}"));
        let b: Vec<u8> = mac
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The Python interpreter, by absolute path (namespaces' `ip netns exec` keeps PATH, but
/// shims may not resolve there).
pub fn python() -> String {
    let out = sh(&["python3", "-c", "import sys; print(sys.executable)"]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The helper script beside the tests.
pub fn netprobe() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/netprobe.py")
        .display()
        .to_string()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One port of the agent under test.
#[derive(Debug, Clone)]
pub struct TapPort {
    pub iface: String,
    pub role: &'static str,
}

/// The agent process, stopped with SIGTERM on drop.
#[derive(Debug)]
pub struct AgentProc {
    pub child: Option<Child>,
    pub link: SocketAddr,
    pub dir: PathBuf,
}

impl AgentProc {
    /// Writes a config for `ports` (net_tapN in order) and starts the agent; returns once the
    /// link accepts connections and every tap interface exists.
    pub fn start(tag: &str, ports: &[TapPort]) -> AgentProc {
        let dir = std::env::temp_dir().join(format!("dpu-agent-test-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let link_port = free_port();
        let mut cfg = format!(
            "dpu_id = \"dpu-{tag}\"\n[eal]\nargs = [\"-l\", \"0\", \"--no-huge\", \"--no-pci\", \"--no-shconf\", \"-m\", \"512\", \"--log-level=*:warning\"]\n[lcores]\nforwarding = 0\n[link]\nlisten = \"127.0.0.1:{link_port}\"\n"
        );
        for (i, p) in ports.iter().enumerate() {
            // Unique PMD names per test process, so parallel agents do not collide.
            cfg.push_str(&format!(
                "[[ports]]\nname = \"net_tap{i}\"\ndevice = \"net_tap{i},iface={}\"\nrole = \"{}\"\n",
                p.iface, p.role
            ));
        }
        let cfg_path = dir.join("agent.toml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dpu-agent"))
            .arg("--config")
            .arg(&cfg_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let link: SocketAddr = format!("127.0.0.1:{link_port}").parse().unwrap();
        let mut me = AgentProc {
            child: Some(child),
            link,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = TcpStream::connect_timeout(&link, Duration::from_millis(200)).is_ok()
                && ports
                    .iter()
                    .all(|p| Path::new("/sys/class/net").join(&p.iface).exists());
            if up {
                break;
            }
            if let Some(c) = me.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("agent exited early ({st}):\n{}", me.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent did not come up:\n{}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    /// Starts the agent with the reference NIC backend over two `net_null` ports (uplink,
    /// VPC): no interfaces, no traffic; returns once the link accepts connections.
    pub fn start_reference(tag: &str) -> AgentProc {
        let dir = std::env::temp_dir().join(format!("dpu-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let cfg = format!(
            "dpu_id = \"dpu-{tag}\"\n[eal]\nargs = [\"-l\", \"0\", \"--no-huge\", \"--no-pci\", \"--no-shconf\", \"-m\", \"256\", \"--log-level=*:warning\"]\n[[ports]]\nname = \"net_null0\"\ndevice = \"net_null0\"\nrole = \"uplink\"\n[[ports]]\nname = \"net_null1\"\ndevice = \"net_null1\"\nrole = \"vpc\"\n[lcores]\nforwarding = 0\n[link]\nlisten = \"127.0.0.1:{port}\"\n[nic]\nbackend = \"reference\"\nprofile = \"full\"\n"
        );
        let cfg_path = dir.join("agent.toml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dpu-agent"))
            .arg("--config")
            .arg(&cfg_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let link: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut me = AgentProc {
            child: Some(child),
            link,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&link, Duration::from_millis(200)).is_err() {
            if let Some(c) = me.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("agent exited early ({st}):\n{}", me.log());
                }
            }
            assert!(Instant::now() < deadline, "no link:\n{}", me.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let st = child.wait().unwrap();
                panic!(
                    "agent ignored SIGTERM for 15 s (killed: {st}):\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The host side of the link, as the host agent speaks it.
#[derive(Debug)]
pub struct HostLink {
    stream: TcpStream,
    reader: FrameReader,
    codec: FrameCodec,
    pub hello: Hello,
}

impl HostLink {
    pub fn connect(addr: SocketAddr) -> HostLink {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let codec = FrameCodec::default();
        let mut link = HostLink {
            stream,
            reader: FrameReader::new(codec),
            codec,
            hello: Hello {
                dpu_id: String::new(),
                agent_version: String::new(),
                boot_id: 0,
                last_epoch: None,
                ports: Vec::new(),
                protocol: 0,
                features: Features::empty(),
            },
        };
        match link.recv(Duration::from_secs(10), |_| true) {
            Message::Hello(h) => link.hello = h,
            other => panic!("expected hello, got {other:?}"),
        }
        link.send(&Message::HostHello(HostHello {
            protocol: PROTOCOL_VERSION,
            features: Features::IMAGES,
        }));
        link
    }

    /// Connects and reads the hello without answering it (for tests of the introduction).
    pub fn connect_silent(addr: SocketAddr) -> (TcpStream, Hello) {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut reader = FrameReader::new(FrameCodec::default());
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = reader.next::<Message>().unwrap() {
                match m {
                    Message::Hello(h) => return (stream, h),
                    other => panic!("expected hello, got {other:?}"),
                }
            }
            assert!(Instant::now() < deadline, "no hello");
            match (&stream).read(&mut buf) {
                Ok(0) => panic!("agent closed the link"),
                Ok(n) => reader.push(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("link read: {e}"),
            }
        }
    }

    /// Sends raw bytes (a forged frame).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send(&mut self, m: &Message) {
        let mut out = Vec::new();
        self.codec.encode(m, &mut out).unwrap();
        self.stream.write_all(&out).unwrap();
    }

    /// The next message `want` accepts (others, such as heartbeats, are skipped).
    pub fn recv(&mut self, timeout: Duration, want: impl Fn(&Message) -> bool) -> Message {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            while let Some(m) = self.reader.next::<Message>().unwrap() {
                if want(&m) {
                    return m;
                }
            }
            assert!(Instant::now() < deadline, "no message in {timeout:?}");
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("agent closed the link"),
                Ok(n) => self.reader.push(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("link read: {e}"),
            }
        }
    }

    /// Sends a batch and returns the agent's answer to it.
    pub fn apply(&mut self, epoch: u64, full: bool, changes: Vec<Change>) -> Message {
        self.send(&Message::Apply(Apply {
            epoch,
            full,
            changes,
        }));
        self.recv(Duration::from_secs(30), |m| {
            matches!(m, Message::Ack(a) if a.epoch == epoch)
                || matches!(m, Message::Refused { epoch: Some(e), .. } if *e == epoch)
        })
    }
}
