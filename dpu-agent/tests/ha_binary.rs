//! The real `dpu-agent` binary with `[ha]`: the configuration refuses a non-loopback sync
//! address (no root needed: the agent exits before EAL), and a real agent started as a pair
//! member is a standby that takes a scripted active's stream: hello, snapshot request,
//! snapshot, Ready in its log (root: EAL on `net_null` ports with the reference NIC).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dpu_agent::config::Member;
use dpu_agent::ha::{PairFrame, PairHello, PROTOCOL};
use flow_offload::ha::sync::{SnapshotSource, SyncConfig, SyncMessage, SyncSender};
use flow_offload::soft::nat::ReplicatedSession;
use flow_offload::wire::frame::{FrameCodec, FrameReader};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dpu-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(link: u16, ha: &str) -> String {
    format!(
        "dpu_id = \"dpu-ha\"\n[eal]\nargs = [\"-l\", \"0\", \"--no-huge\", \"--no-pci\", \"--no-shconf\", \"-m\", \"256\", \"--log-level=*:warning\"]\n[[ports]]\nname = \"net_null0\"\ndevice = \"net_null0\"\nrole = \"uplink\"\n[[ports]]\nname = \"net_null1\"\ndevice = \"net_null1\"\nrole = \"vpc\"\n[lcores]\nforwarding = 0\n[link]\nlisten = \"127.0.0.1:{link}\"\n[nic]\nbackend = \"reference\"\n{ha}"
    )
}

#[test]
fn a_non_loopback_sync_address_is_refused_naming_the_field() {
    let d = dir("ha-refused");
    let cfg = d.join("agent.toml");
    let ha = "[ha]\nmember = \"a\"\nsync_listen = \"192.0.2.10:7801\"\npeer = \"127.0.0.1:7802\"\n";
    std::fs::write(&cfg, config(free_port(), ha)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dpu-agent"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("ha.sync_listen"), "{err}");
    assert!(err.contains("TLS"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        c.wait().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
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

/// An empty table: the scripted active has no sessions.
struct Empty;

impl SnapshotSource<ReplicatedSession> for Empty {
    fn rewind(&mut self) {}
    fn next_chunk(&mut self, _max: usize, _out: &mut Vec<ReplicatedSession>) -> bool {
        true
    }
}

#[test]
fn a_real_agent_is_a_standby_that_takes_a_snapshot_and_reports_ready() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("SKIP: needs root (EAL)");
        return;
    }
    let d = dir("ha-standby");
    let (link, sync, peer) = (free_port(), free_port(), free_port());
    let ha = format!(
        "[ha]\nmember = \"b\"\nsync_listen = \"127.0.0.1:{sync}\"\npeer = \"127.0.0.1:{peer}\"\n"
    );
    let cfg = d.join("agent.toml");
    std::fs::write(&cfg, config(link, &ha)).unwrap();
    let log = d.join("agent.log");
    let child = Command::new(env!("CARGO_BIN_EXE_dpu-agent"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let agent = Agent {
        child: Some(child),
        log,
    };
    let addr: SocketAddr = format!("127.0.0.1:{sync}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no sync listener:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        agent.log().contains("pair runtime started"),
        "{}",
        agent.log()
    );
    // The scripted active: member a, epoch 1.
    let codec = FrameCodec::default();
    let mut out = Vec::new();
    let hello = PairFrame::Hello(PairHello {
        protocol: PROTOCOL,
        member: Member::A,
        epoch: 1,
        active: true,
    });
    codec.encode(&hello, &mut out).unwrap();
    stream.write_all(&out).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut tx: SyncSender<ReplicatedSession> = SyncSender::new(SyncConfig::default(), 1).unwrap();
    let mut reader = FrameReader::new(codec);
    let mut got_hello = None;
    let mut report = None;
    let mut requests = 0;
    let start = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !agent.log().contains("standby Ready") {
        assert!(
            Instant::now() < deadline,
            "never Ready (hello {got_hello:?}, {requests} requests):\n{}",
            agent.log()
        );
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => panic!("the agent closed the sync connection:\n{}", agent.log()),
            Ok(n) => reader.push(&buf[..n]),
            Err(_) => {}
        }
        while let Some(f) = reader.next::<PairFrame>().unwrap() {
            match f {
                PairFrame::Hello(h) => got_hello = Some(h),
                PairFrame::Standby(r) => report = Some(r.ready),
                PairFrame::Sync(m) => {
                    if matches!(m, SyncMessage::SnapshotRequest(_)) {
                        requests += 1;
                    }
                    tx.handle(m).unwrap();
                }
            }
        }
        let now = start.elapsed().as_nanos() as u64;
        out.clear();
        while let Some(b) = tx.poll_transmit(now) {
            codec
                .encode(&PairFrame::Sync(SyncMessage::Batch(b)), &mut out)
                .unwrap();
        }
        while let Some(m) = tx.poll_snapshot(&mut Empty, now) {
            codec.encode(&PairFrame::Sync(m), &mut out).unwrap();
        }
        if let Some(hb) = tx.poll_heartbeat(now) {
            codec
                .encode(&PairFrame::Sync(SyncMessage::Heartbeat(hb)), &mut out)
                .unwrap();
        }
        stream.write_all(&out).unwrap();
    }
    let h = got_hello.expect("the standby answers the hello");
    assert_eq!(
        (h.member, h.active, h.protocol),
        (Member::B, false, PROTOCOL)
    );
    assert!(requests >= 1, "the standby asked for a snapshot");
    assert!(report.is_some(), "the standby reports its replica");
    // SIGTERM: the agent stops the pair thread with everything else and exits 0.
    let mut agent = agent;
    let status = agent.stop();
    assert!(status.success(), "{status:?}\n{}", agent.log());
    let _ = std::fs::remove_dir_all(&d);
}
