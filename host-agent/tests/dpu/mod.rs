//! A DPU agent for host-agent tests: the real `dpu_agent` link server and state, on a thread of
//! this process, over the reference NIC (Full profile). Stopped on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dpu_agent::agent::Agent;
use dpu_agent::config::Role;
use dpu_agent::link::{serve, Identity};
use flow_offload::caps::{Caps, Profile};
use flow_offload::model::PortId;
use flow_offload::program::RefNicTarget;
use flow_offload::refnic::RefNic;
use flow_offload::soft::pipeline::PipelineLimits;

/// The agent's thread.
pub struct Dpu {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Dpu {
    /// Serves `addr` as `dpu_id`, with these port roles.
    pub fn start(addr: SocketAddr, dpu_id: &str, boot_id: u64, roles: &[(u16, Role)]) -> Dpu {
        let listener = TcpListener::bind(addr).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let roles: BTreeMap<PortId, Role> = roles.iter().map(|(p, r)| (PortId(*p), *r)).collect();
        let dpu_id = dpu_id.to_owned();
        let thread = std::thread::spawn(move || {
            let caps = Caps::profile(Profile::Full);
            let ports = roles.keys().map(|p| (*p, caps.clone())).collect();
            let mut agent = Agent::new(caps.clone(), roles, PipelineLimits::default(), 1).unwrap();
            let mut target = RefNicTarget::new(RefNic::new(caps));
            let id = Identity {
                dpu_id,
                agent_version: "test".into(),
                boot_id,
                ports,
                ha: None,
                announcer: None,
            };
            serve(&listener, &mut agent, &mut target, &id, &s, None).unwrap();
        });
        Dpu {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Dpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// SIGTERM to a daemon, then its exit status (killed and failed after 15 s).
pub fn terminate(child: &mut Child, log: impl Fn() -> String) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("daemon ignored SIGTERM\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
