//! `dpu-agent --config FILE`: the DPU daemon.
//!
//! Start: read the configuration, start EAL with the configured ports, configure and start
//! them, probe what each can offload (logged as a table), compile for what all of them accept,
//! start the software forwarding lcore, then serve the host link. SIGTERM or SIGINT: stop the
//! lcore, destroy every flow and meter, close the ports, exit 0.
//!
//! With `[ha]`, the agent is a member of an A/B pair (see `dpu_agent::ha`): its NAT tables
//! allocate from its half of every port range, nothing is allocated until the host relays that
//! this member holds the leader key, and the pair thread syncs NAT sessions with the peer.
//!
//! With `[image]`, the start counts as a boot of the slot the boot state names (a try of a slot
//! on trial is used up first thing), and once the ports are up the health check commits the
//! trial or restarts. A restart (an unhealthy trial, or a flash with `activate`) shuts down as
//! cleanly as SIGTERM does and then re-executes the agent, which reads the boot state anew.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use dpdk::{DpdkTarget, Eal, Mempool, Port, PortConfig};
use dpu_agent::agent::Agent;
use dpu_agent::announce::Announcer;
use dpu_agent::config::Config;
use dpu_agent::ha::{HaError, HaRuntime, PairSettings};
use dpu_agent::image::{Gate, ImageSetupError, Images};
use dpu_agent::lcore::{self, LcoreStats};
use dpu_agent::link::{self, Identity};
use flow_offload::caps::{Caps, Refusal};
use flow_offload::compile::RuleId;
use flow_offload::ir::{MeterRef, Rule};
use flow_offload::model::{MeterProfile, PortId};
use flow_offload::program::{CountQuery, FlowTarget, RefNicTarget};
use flow_offload::refnic::RefNic;
use flow_offload::soft::pipeline::PipelineLimits;
use nix::sys::signal::{SigSet, Signal};

#[derive(Debug, Parser)]
#[command(version, about = "DPU agent: rte_flow offload with software fallback")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: PathBuf,
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] dpu_agent::config::ConfigError),
    #[error("EAL: {0}")]
    Eal(#[from] dpdk::EalError),
    #[error("mempool: {0}")]
    Mempool(#[from] dpdk::MempoolError),
    #[error("port {name}: {source}")]
    Port {
        name: String,
        source: dpdk::PortError,
    },
    #[error("software pipeline: {0}")]
    Pipeline(#[from] flow_offload::soft::pipeline::PipelineError),
    #[error("link listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("signals: {0}")]
    Signals(#[from] nix::Error),
    #[error("{0}")]
    Image(#[from] ImageSetupError),
    #[error("pair: {0}")]
    Ha(#[from] HaError),
}

/// How a run ended.
enum Exit {
    /// Stopped by a signal (or the link server failed).
    Stopped,
    /// Restart into the slot the boot state names.
    Restart,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(Exit::Stopped) => ExitCode::SUCCESS,
        Ok(Exit::Restart) => reexec(),
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("dpu-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Replaces this process with a fresh start of the agent, same arguments and environment.
fn reexec() -> ExitCode {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let argv: Result<Vec<CString>, _> = std::env::args_os()
        .map(|a| CString::new(a.as_bytes()))
        .collect();
    let exe = CString::new("/proc/self/exe");
    if let Err(e) = dpdk::cloexec_inherited_fds() {
        tracing::warn!(error = %e, "could not mark inherited descriptors close-on-exec");
    }
    if let (Ok(exe), Ok(argv)) = (exe, argv) {
        tracing::info!("restarting (boot into the slot the boot state names)");
        let err = nix::unistd::execv(&exe, &argv);
        tracing::error!(error = ?err, "re-exec failed");
        eprintln!("dpu-agent: re-exec failed: {err:?}");
    }
    ExitCode::FAILURE
}

fn run(args: &Args) -> Result<Exit, StartError> {
    let config = Config::load(&args.config)?;
    let listen = config.listen_addr()?;
    // First thing: this start is a boot (a slot on trial loses a try even if we die below).
    let mut images = config.image.as_ref().map(Images::open).transpose()?;

    // Block SIGTERM/SIGINT before any thread exists (EAL's included), so they all inherit the
    // mask and only the waiter below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;
    let stop = AtomicBool::new(false);
    let signalled = AtomicBool::new(false);

    let eal_args = config.eal_args();
    tracing::info!(args = ?eal_args, "starting EAL");
    let eal = Eal::init(&eal_args)?;
    let pool = Mempool::pktmbuf(
        &eal,
        "dpu_agent_pool",
        config.limits.mbufs,
        256,
        Mempool::DEFAULT_DATA_ROOM,
        None,
    )?;
    let mut ports: Vec<Port<'_>> = Vec::new();
    for p in &config.ports {
        let port_err = |source| StartError::Port {
            name: p.name.clone(),
            source,
        };
        let id = Port::id_by_name(&eal, &p.name).map_err(port_err)?;
        let mut port = Port::configure(id, &pool, PortConfig::default()).map_err(port_err)?;
        port.start().map_err(port_err)?;
        tracing::info!(port = %p.name, id, role = ?p.role, "port started");
        ports.push(port);
    }

    // Probe: what each port accepts; compile for what all accept. With the reference NIC,
    // its profile stands in for every port.
    let reference = config.reference_caps();
    let mut caps: Option<Caps> = reference.clone();
    let mut per_port = Vec::new();
    if let Some(c) = &reference {
        tracing::info!(source = ?c.source, max_rules = c.max_rules,
            "[nic] backend = \"reference\": rules go to the reference NIC model, not to the ports; nothing is offloaded in hardware");
        for port in &ports {
            per_port.push((PortId(port.id()), c.clone()));
        }
    }
    for (port, p) in ports
        .iter()
        .zip(&config.ports)
        .filter(|_| reference.is_none())
    {
        let probe = dpdk::probe(port);
        tracing::info!(
            "port {} ({}) offload probe:\n{}",
            p.name,
            port.id(),
            probe.table()
        );
        caps = Some(match caps {
            None => probe.caps.clone(),
            Some(c) => c.meet(&probe.caps),
        });
        per_port.push((PortId(port.id()), probe.caps));
    }
    let caps = caps.unwrap_or_else(|| Caps::profile(flow_offload::caps::Profile::None));
    tracing::info!(?caps, "compiling for these capabilities");

    let roles: BTreeMap<PortId, _> = ports
        .iter()
        .zip(&config.ports)
        .map(|(port, p)| (PortId(port.id()), p.role))
        .collect();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5eed);
    let limits = PipelineLimits {
        nat_sessions: config.limits.nat_sessions,
        max_routes: config.limits.max_routes,
        ..PipelineLimits::default()
    };
    let mut agent = Agent::new(caps, roles, limits, seed)?;
    // With [ha]: this member's NAT block, allocation stopped until the leader key says this
    // member is active, and the sync thread. Before the lcore starts and the host link serves.
    let ha = match &config.ha {
        Some(h) => Some(HaRuntime::start(
            PairSettings::from_config(h)?,
            agent.pipeline(),
            agent.clock(),
        )?),
        None => None,
    };
    // The host link relays the leader key's outcome (HaRole) to the runtime.
    let identity = Identity {
        dpu_id: config.dpu_id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id: seed,
        ports: per_port,
        ha: ha.as_ref().map(HaRuntime::handle),
        announcer: ha
            .as_ref()
            .map(|_| std::sync::Arc::new(Announcer::default())),
    };
    let listener = TcpListener::bind(listen).map_err(|source| StartError::Listen {
        addr: listen.to_string(),
        source,
    })?;
    tracing::info!(%listen, dpu_id = %config.dpu_id, "serving the host link");

    // The health gate: the ports are up; a slot on trial commits or we restart.
    let mut exit = Exit::Stopped;
    if let Some(im) = images.as_mut() {
        if let Gate::Restart { reason } = im.health_gate()? {
            tracing::warn!(%reason, "restarting without serving");
            exit = Exit::Restart;
        }
    }

    let stats = LcoreStats::default();
    let clock = agent.clock();
    let forwarding_cpu = config.lcores.forwarding;
    let mut target = match reference {
        Some(c) => Target::Reference(RefNicTarget::new(RefNic::new(c))),
        None => Target::Dpdk(DpdkTarget::new(ports.iter())),
    };
    let mut queues = Vec::new();
    for (port, p) in ports.iter().zip(&config.ports) {
        queues.push(port.queue().map_err(|source| StartError::Port {
            name: p.name.clone(),
            source,
        })?);
    }
    std::thread::scope(|s| {
        // The signal waiter: the only thread with SIGTERM/SIGINT deliverable. It always
        // takes exactly one signal: a real one, or the wake-up sent below when we stop on our
        // own. A wake-up left pending would survive the re-exec of a restart (pending signals
        // do) and stop the next start.
        let stop_ref = &stop;
        let signalled_ref = &signalled;
        s.spawn(move || match signals.wait() {
            Ok(sig) => {
                if !stop_ref.swap(true, Ordering::SeqCst) {
                    signalled_ref.store(true, Ordering::SeqCst);
                    tracing::info!(signal = ?sig, "shutting down");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "sigwait failed; shutting down");
                signalled_ref.store(true, Ordering::SeqCst);
                stop_ref.store(true, Ordering::SeqCst);
            }
        });
        let pipeline = agent.pipeline();
        let stats_ref = &stats;
        let pool_ref = &pool;
        let announcer = identity.announcer.clone().unwrap_or_default();
        s.spawn(move || {
            pin_to(forwarding_cpu);
            tracing::info!(cpu = forwarding_cpu, "forwarding lcore running");
            lcore::run(
                queues, pipeline, stop_ref, stats_ref, clock, pool_ref, &announcer,
            );
            tracing::info!("forwarding lcore stopped");
        });
        if matches!(exit, Exit::Stopped) {
            if let Err(e) = link::serve(
                &listener,
                &mut agent,
                &mut target,
                &identity,
                &stop,
                images.as_mut(),
            ) {
                tracing::error!(error = %e, "link server failed; shutting down");
            }
            if images.as_ref().is_some_and(Images::restart_requested) {
                exit = Exit::Restart;
            }
        }
        if !stop.swap(true, Ordering::SeqCst) {
            // We stop on our own: wake the signal waiter, which takes this signal.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGTERM);
        }
    });
    if signalled.load(Ordering::SeqCst) {
        // An operator's SIGTERM wins over a restart.
        exit = Exit::Stopped;
    }
    if let Some(h) = ha {
        h.stop();
    }
    tracing::info!(stats = %stats.summary(), "lcore counters");
    if let Target::Dpdk(t) = &mut target {
        for e in &t.clear() {
            tracing::warn!("{e}");
        }
    }
    tracing::info!("flows destroyed, closing ports");
    drop(target);
    drop(ports);
    drop(pool);
    drop(eal);
    Ok(exit)
}

/// Where the rules go.
enum Target<'a> {
    Dpdk(DpdkTarget<'a>),
    Reference(RefNicTarget),
}

impl FlowTarget for Target<'_> {
    fn create_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
        match self {
            Target::Dpdk(t) => t.create_rule(id, rule),
            Target::Reference(t) => t.create_rule(id, rule),
        }
    }
    fn replace_rule(&mut self, id: &RuleId, rule: &Rule) -> Result<(), Refusal> {
        match self {
            Target::Dpdk(t) => t.replace_rule(id, rule),
            Target::Reference(t) => t.replace_rule(id, rule),
        }
    }
    fn destroy_rule(&mut self, id: &RuleId) {
        match self {
            Target::Dpdk(t) => t.destroy_rule(id),
            Target::Reference(t) => t.destroy_rule(id),
        }
    }
    fn create_meter(&mut self, meter: MeterRef, profile: &MeterProfile) -> Result<(), Refusal> {
        match self {
            Target::Dpdk(t) => t.create_meter(meter, profile),
            Target::Reference(t) => t.create_meter(meter, profile),
        }
    }
    fn update_meter(&mut self, meter: MeterRef, profile: &MeterProfile) -> Result<(), Refusal> {
        match self {
            Target::Dpdk(t) => t.update_meter(meter, profile),
            Target::Reference(t) => t.update_meter(meter, profile),
        }
    }
    fn destroy_meter(&mut self, meter: MeterRef) {
        match self {
            Target::Dpdk(t) => t.destroy_meter(meter),
            Target::Reference(t) => t.destroy_meter(meter),
        }
    }
}

impl CountQuery for Target<'_> {
    fn query_count(&mut self, id: &RuleId) -> Option<(u64, u64)> {
        match self {
            Target::Dpdk(t) => t.query_count(id),
            Target::Reference(t) => t.query_count(id),
        }
    }
}

/// Pins the calling thread to `cpu` (logs and carries on if that fails, e.g. the CPU is not
/// in the process's allowed set).
fn pin_to(cpu: u32) {
    let mut set = nix::sched::CpuSet::new();
    let pinned = set
        .set(cpu as usize)
        .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    if let Err(e) = pinned {
        tracing::warn!(cpu, error = %e, "could not pin the forwarding lcore");
    }
}
