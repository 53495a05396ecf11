//! The real `host-agent` binary for tests: started on a config file in its own directory,
//! its log in `host-agent.log` there, its metrics read over HTTP, stopped (SIGTERM, then
//! SIGKILL after 15 s) by PID on drop. A fake zebra speaks FPM to it over TCP.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_debug_implementations
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host_agent::fpm::build::{self, NlWriter, RouteSpec};
use host_agent::fpm::decode::{RouteKind, RouteNexthops, NLM_F_REPLACE, NLM_F_REQUEST};
use host_agent::fpm::frame::encode_frame;
use host_agent::fpm::{decode_netlink, FpmEvent, FrameDecoder};

/// A free loopback address.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The daemon.
pub struct Agent {
    child: Child,
    dir: std::path::PathBuf,
    /// gRPC API.
    pub api: SocketAddr,
    /// Prometheus endpoint.
    pub metrics: SocketAddr,
    /// FPM port, if configured.
    pub fpm: Option<SocketAddr>,
}

impl Agent {
    /// Starts the daemon against etcd at `etcd`; `fpm` adds an `[fpm]` section (with `fpm_extra`
    /// lines in it), `extra` is appended at the end (`[[dpus]]`, ...).
    pub fn start(name: &str, etcd: &str, fpm: Option<&str>, extra: &str) -> Agent {
        let (api, metrics) = (free_addr(), free_addr());
        let fpm_addr = fpm.map(|_| free_addr());
        let dir = std::env::temp_dir().join(format!("ha-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = format!(
            "[etcd]\nendpoints = [\"{etcd}\"]\n[api]\nlisten = \"{api}\"\n[metrics]\nlisten = \"{metrics}\"\n"
        );
        if let (Some(a), Some(more)) = (fpm_addr, fpm) {
            cfg.push_str(&format!(
                "[fpm]\nlisten = \"{a}\"\ntable_encoding = \"table-id\"\n{more}\n"
            ));
        }
        cfg.push_str(extra);
        let path = dir.join("host-agent.toml");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_host-agent"))
            .arg("--config")
            .arg(&path)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("host-agent.log")).unwrap())
            .spawn()
            .unwrap();
        Agent {
            child,
            dir,
            api,
            metrics,
            fpm: fpm_addr,
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("host-agent.log")).unwrap_or_default()
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// Waits (bounded) until the daemon logged `needle` at least `n` times.
    pub async fn wait_log(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.log().matches(needle).count() < n {
            assert!(
                Instant::now() < deadline,
                "never logged {n}× {needle:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The metrics text (retried while the daemon starts).
    pub fn metrics_text(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(self.metrics) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
                let mut out = String::new();
                if s.read_to_string(&mut out).is_ok() && out.contains("200 OK") {
                    return out;
                }
            }
            assert!(
                Instant::now() < deadline,
                "metrics endpoint {} never answered\n{}",
                self.metrics,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One series' value: `series` is the exact text before the value
    /// (`dpucp_etcd_up`, `dpucp_dpu_link_up{dpu="a"}`).
    pub fn metric(&self, series: &str) -> Option<f64> {
        parse_metric(&self.metrics_text(), series)
    }

    /// Polls the metrics every 100 ms until `series` reads `want`, for at most `within`;
    /// returns how long it took.
    pub async fn wait_metric(&self, series: &str, want: f64, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let text = self.metrics_text();
            let got = parse_metric(&text, series);
            if got == Some(want) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{series} is {got:?}, not {want}, {:?} on\n{text}\n{}",
                start.elapsed(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A TCP connection to the FPM port (retried while the daemon starts).
    pub fn connect_fpm(&self) -> TcpStream {
        let addr = self.fpm.expect("no [fpm] configured");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match TcpStream::connect(addr) {
                Ok(s) => return s,
                Err(e) => assert!(Instant::now() < deadline, "FPM port: {e}\n{}", self.log()),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `dpuctl` against this daemon.
    pub fn dpuctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_dpuctl"))
            .args(["--server", &format!("http://{}", self.api)])
            .args(args)
            .output()
            .unwrap()
    }

    /// `dpuctl --json status`, parsed.
    pub fn status_json(&self) -> Vec<serde_json::Value> {
        let out = self.dpuctl(&["--json", "status"]);
        assert!(
            out.status.success(),
            "dpuctl status: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of `series` in a Prometheus text exposition.
pub fn parse_metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// One zebra-shaped RTM_NEWROUTE frame in the main table.
pub fn route_frame(prefix: &str, kind: RouteKind, nexthops: Option<&RouteNexthops>) -> Vec<u8> {
    let mut w = NlWriter::new();
    build::route(
        &mut w,
        true,
        NLM_F_REQUEST | NLM_F_REPLACE,
        &RouteSpec {
            table: 254,
            prefix: prefix.parse().unwrap(),
            protocol: 196,
            kind,
            rtm_flags: 0,
            metric: Some(20),
            nexthops,
        },
    );
    let mut f = Vec::new();
    encode_frame(&w.buf, &mut f).unwrap();
    f
}

/// A static blackhole (taken without any interface or neighbour configured).
pub fn blackhole(prefix: &str) -> Vec<u8> {
    route_frame(prefix, RouteKind::Blackhole, None)
}

/// The acknowledgements zebra reads: (prefix, rtm_flags), in order.
pub fn read_feedback(dec: &mut FrameDecoder, bytes: &[u8]) -> Vec<(String, u32)> {
    dec.extend(bytes);
    let mut out = Vec::new();
    while let Ok(Some(f)) = dec.next_frame() {
        // nlmsghdr (16), then rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
        // type, flags (u32).
        let flags = f
            .get(24..28)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0);
        let mut evs = Vec::new();
        decode_netlink(f, &mut evs, &mut Default::default());
        for e in evs {
            if let FpmEvent::Route(r) = e {
                out.push((r.prefix.to_string(), flags));
            }
        }
    }
    out
}
