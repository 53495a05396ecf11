//! The host link server: the host agent connects over TCP and speaks framed postcard
//! [`Message`]s (see [`flow_offload::wire`]).
//!
//! One host at a time. On every connection the agent says [`Message::Hello`] first (with its
//! link protocol and features, and the last epoch it applied, `None` after a restart: the host
//! then resends everything). The host answers with [`Message::HostHello`]; a host speaking
//! another protocol is refused ([`Refusal::Incompatible`]) and disconnected, and a batch sent
//! before the host's hello is refused. The agent answers each [`Message::Apply`] with an ack,
//! and sends a heartbeat every second and route counters every [`COUNTERS_EVERY`]. A host silent
//! for [`HOST_TIMEOUT`] is dropped; a framing error drops the connection (the byte stream cannot
//! be resynchronised). A well-framed message that cannot be decoded, or that a host must not
//! send, is answered with [`Message::Refused`] naming why (and the batch's epoch when it was
//! one), never skipped in silence. Forwarding continues on the last state while no host is
//! connected.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use flow_offload::caps::Caps;
use flow_offload::model::PortId;
use flow_offload::program::{CountQuery, FlowTarget};
use flow_offload::wire::frame::{FrameCodec, FrameError, FrameReader};
use flow_offload::wire::{
    read_message, Counters, Features, FlashFailure, FlashPhase, FlashStatus, Hello, Message,
    Refusal, PROTOCOL_VERSION,
};

use crate::agent::Agent;
use crate::announce::{router_mac_announcements, Announcer};
use crate::ha::HaHandle;
use crate::image::Images;

/// Session offload housekeeping period (well below the shortest NAT timeout).
pub const TICK_EVERY: Duration = Duration::from_millis(200);
/// A pair's active re-announces its router MAC this often.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// Heartbeat period.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Counter report period.
pub const COUNTERS_EVERY: Duration = Duration::from_secs(5);
/// A host that sends nothing for this long is disconnected.
pub const HOST_TIMEOUT: Duration = Duration::from_secs(15);
/// Routes whose counters are read per pipeline lock (the lcore waits meanwhile).
const COUNTER_CHUNK: usize = 4096;

/// Who this agent is, for [`Message::Hello`].
#[derive(Debug, Clone)]
pub struct Identity {
    /// DPU id.
    pub dpu_id: String,
    /// Agent version.
    pub agent_version: String,
    /// Random per start.
    pub boot_id: u64,
    /// Probed capabilities per port.
    pub ports: Vec<(PortId, Caps)>,
    /// The pair runtime, when this agent is a member of an A/B pair.
    pub ha: Option<HaHandle>,
    /// Where a member that becomes active queues its router MAC announcements.
    pub announcer: Option<std::sync::Arc<Announcer>>,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Socket error.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The byte stream lost its framing.
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    /// The host said nothing for too long.
    #[error("host silent for {0:?}")]
    Timeout(Duration),
    /// The host closed the connection.
    #[error("host closed the connection")]
    Closed,
    /// The host speaks another link protocol.
    #[error("host speaks link protocol {theirs}, this agent speaks {ours}")]
    Incompatible {
        /// Ours.
        ours: u16,
        /// The host's.
        theirs: u16,
    },
}

fn stopping(stop: &AtomicBool, images: Option<&Images>) -> bool {
    stop.load(Ordering::Relaxed) || images.is_some_and(Images::restart_requested)
}

/// Serves hosts until `stop` is set (or a flash asks for a restart into the new slot):
/// accepts, then talks to one host at a time. `images`: the slots this agent flashes, if any.
pub fn serve<T: FlowTarget + CountQuery + ?Sized>(
    listener: &TcpListener,
    agent: &mut Agent,
    target: &mut T,
    id: &Identity,
    stop: &AtomicBool,
    mut images: Option<&mut Images>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut last_tick = Instant::now();
    while !stopping(stop, images.as_deref()) {
        if let Some(im) = images.as_deref_mut() {
            im.drain(); // keeps the newest status for the next host
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                tracing::info!(%peer, "host connected");
                match session(stream, agent, target, id, stop, images.as_deref_mut()) {
                    Ok(()) => tracing::info!(%peer, "host link closed (shutdown)"),
                    Err(e) => tracing::warn!(%peer, error = %e, "host link ended"),
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                std::thread::sleep(Duration::from_millis(50));
                if last_tick.elapsed() >= TICK_EVERY {
                    agent.tick(target);
                    last_tick = Instant::now();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Ok(())
}

fn send(stream: &mut TcpStream, codec: &FrameCodec, msg: &Message) -> Result<(), LinkError> {
    let mut out = Vec::new();
    codec.encode(msg, &mut out)?;
    stream.write_all(&out)?;
    Ok(())
}

/// What this agent supports, for its hello.
fn features(images: bool, pair: bool) -> Features {
    let mut f = Features::empty();
    f.set(Features::IMAGES, images);
    f.set(Features::HA_PAIR, pair);
    f
}

/// The pair runtime's state as the host sees it.
fn pair_status(ha: &HaHandle) -> flow_offload::wire::HaStatus {
    use flow_offload::ha::role::Role;
    use flow_offload::wire::PairRole;
    let s = ha.status();
    flow_offload::wire::HaStatus {
        role: match s.role {
            Role::Standby => PairRole::Standby,
            Role::Active { .. } => PairRole::Active,
            Role::Fenced { .. } => PairRole::Fenced,
        },
        epoch: s.epoch,
        // Without its sync connection a standby cannot know it is caught up.
        ready: s.ready && s.connected,
        lag_events: s.lag_events,
        lag_ms: s.lag_ms,
        sessions: u64::try_from(s.sessions).unwrap_or(u64::MAX),
        peer_connected: s.connected,
        handing_over: s.release_lease,
    }
}

/// Answers a message this agent cannot or must not take: logged, then refused to the host.
fn refuse(
    stream: &mut TcpStream,
    codec: &FrameCodec,
    epoch: Option<u64>,
    reason: Refusal,
) -> Result<(), LinkError> {
    tracing::warn!(?epoch, %reason, "message from the host refused");
    send(stream, codec, &Message::Refused { epoch, reason })
}

fn counters(agent: &Agent, at_ns: u64) -> Counters {
    let keys: Vec<_> = agent.model().routes().keys().copied().collect();
    let mut routes = Vec::new();
    let pipeline = agent.pipeline();
    for chunk in keys.chunks(COUNTER_CHUNK) {
        let pipe = pipeline.lock().unwrap_or_else(PoisonError::into_inner);
        for k in chunk {
            if let Some(c) = pipe.route_counters(k) {
                if c.packets > 0 {
                    routes.push((*k, c.packets, c.bytes));
                }
            }
        }
    }
    Counters { at_ns, routes }
}

fn session<T: FlowTarget + CountQuery + ?Sized>(
    mut stream: TcpStream,
    agent: &mut Agent,
    target: &mut T,
    id: &Identity,
    stop: &AtomicBool,
    mut images: Option<&mut Images>,
) -> Result<(), LinkError> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let codec = FrameCodec::default();
    let start = Instant::now();
    send(
        &mut stream,
        &codec,
        &Message::Hello(Hello {
            dpu_id: id.dpu_id.clone(),
            agent_version: id.agent_version.clone(),
            boot_id: id.boot_id,
            last_epoch: agent.last_epoch(),
            ports: id.ports.clone(),
            protocol: PROTOCOL_VERSION,
            features: features(images.is_some(), id.ha.is_some()),
        }),
    )?;
    if let Some(im) = images.as_deref_mut() {
        send(&mut stream, &codec, &Message::Boot(im.report()))?;
        im.drain();
        if let Some(last) = im.last_status() {
            send(&mut stream, &codec, &Message::Flash(last.clone()))?;
        }
    }
    let host_ip = stream.peer_addr()?.ip();
    let mut reader = FrameReader::new(codec);
    let mut buf = vec![0u8; 256 * 1024];
    let mut last_rx = Instant::now();
    let mut last_hb = Instant::now();
    let mut last_counters = Instant::now();
    let mut seq = 0u64;
    let mut last_tick = Instant::now();
    let mut host_hello = false;
    let mut last_pair: Option<flow_offload::wire::HaStatus> = None;
    let mut last_pair_sent = Instant::now();
    let mut last_announce = Instant::now();
    while !stopping(stop, images.as_deref()) {
        match stream.read(&mut buf) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(n) => {
                last_rx = Instant::now();
                reader.push(buf.get(..n).unwrap_or(&[]));
            }
            // net_tap signals the process (SIGIO): reads get interrupted.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.into()),
        }
        loop {
            let msg = match reader.next_payload(read_message) {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err((epoch, reason)))) => {
                    refuse(&mut stream, &codec, epoch, reason)?;
                    continue;
                }
                Ok(None) => break,
                Err(e) => return Err(e.into()),
            };
            match msg {
                Message::HostHello(h) => {
                    if h.protocol != PROTOCOL_VERSION {
                        let (ours, theirs) = (PROTOCOL_VERSION, h.protocol);
                        refuse(
                            &mut stream,
                            &codec,
                            None,
                            Refusal::Incompatible { ours, theirs },
                        )?;
                        return Err(LinkError::Incompatible { ours, theirs });
                    }
                    tracing::info!(features = ?h.features, "host hello");
                    host_hello = true;
                }
                Message::Apply(batch) if !host_hello => {
                    let reason = Refusal::Unexpected("a batch before the host's hello".to_owned());
                    refuse(&mut stream, &codec, Some(batch.epoch), reason)?;
                }
                Message::Apply(batch) => {
                    let t = Instant::now();
                    let (reply, report) = agent.apply(target, &batch);
                    match &reply {
                        Message::Refused { reason, .. } => {
                            tracing::warn!(epoch = batch.epoch, %reason, "batch refused");
                        }
                        _ => tracing::info!(
                            epoch = batch.epoch,
                            full = batch.full,
                            changes = report.changes,
                            rebuilt = report.rebuilt,
                            hw_ops = report.hw_ops,
                            nic_refusals = report.nic_refusals,
                            status_changes = report.status_changes,
                            took_ms = t.elapsed().as_millis() as u64,
                            "batch applied"
                        ),
                    }
                    send(&mut stream, &codec, &reply)?;
                }
                Message::Heartbeat { .. } => {}
                Message::FlashImage(order) => {
                    let refused = match images.as_deref_mut() {
                        None => Some(FlashStatus {
                            image_id: order.image_id,
                            phase: FlashPhase::Failed {
                                failure: FlashFailure::NotConfigured,
                                message: "this DPU agent has no [image] configuration".to_owned(),
                            },
                        }),
                        Some(im) => im.start_flash(&order, host_ip).err(),
                    };
                    if let Some(st) = refused {
                        if let FlashPhase::Failed { message, .. } = &st.phase {
                            tracing::warn!(%message, "flash refused");
                        }
                        send(&mut stream, &codec, &Message::Flash(st))?;
                    }
                }
                Message::Refused { epoch, reason } => {
                    // Never answered: two sides refusing each other's refusals would loop.
                    tracing::warn!(?epoch, %reason, "the host refused a message of ours");
                }
                Message::HaSwitchover { epoch } => match &id.ha {
                    Some(ha) => {
                        tracing::info!(epoch, "planned switchover requested by the host");
                        ha.request_switchover(epoch);
                    }
                    None => {
                        let what = "a switchover, but this agent has no [ha] section".to_owned();
                        refuse(&mut stream, &codec, None, Refusal::Unexpected(what))?;
                    }
                },
                Message::HaRole(r) => match &id.ha {
                    Some(ha) => {
                        let valid_until =
                            Instant::now() + Duration::from_millis(u64::from(r.valid_ms));
                        tracing::debug!(
                            epoch = r.epoch,
                            active = r.active,
                            valid_ms = r.valid_ms,
                            "pair role from the host"
                        );
                        ha.set_role(r.epoch, r.active, valid_until);
                    }
                    None => {
                        let what = "a pair role, but this agent has no [ha] section".to_owned();
                        refuse(&mut stream, &codec, None, Refusal::Unexpected(what))?;
                    }
                },
                other @ (Message::Hello(_)
                | Message::Ack(_)
                | Message::Counters(_)
                | Message::Flash(_)
                | Message::Boot(_)
                | Message::HaStatus(_)) => {
                    let what = format!("{} from a host", other.kind());
                    refuse(&mut stream, &codec, None, Refusal::Unexpected(what))?;
                }
            }
        }
        if let Some(im) = images.as_deref_mut() {
            let mut armed = false;
            for st in im.drain() {
                armed |= matches!(st.phase, FlashPhase::Flashed { .. });
                send(&mut stream, &codec, &Message::Flash(st))?;
            }
            if armed {
                // A slot is now on trial: the host's view of the boot state changes.
                send(&mut stream, &codec, &Message::Boot(im.report()))?;
            }
        }
        if last_tick.elapsed() >= TICK_EVERY {
            agent.tick(target);
            last_tick = Instant::now();
        }
        if last_hb.elapsed() >= HEARTBEAT_EVERY {
            seq += 1;
            send(&mut stream, &codec, &Message::Heartbeat { seq })?;
            last_hb = Instant::now();
        }
        if let Some(ha) = &id.ha {
            // With every heartbeat, and at once when the role or readiness changes.
            let now = pair_status(ha);
            let changed = last_pair
                .as_ref()
                .is_none_or(|p| (p.role, p.ready, p.epoch) != (now.role, now.ready, now.epoch));
            let became_active = now.role == flow_offload::wire::PairRole::Active
                && last_pair
                    .as_ref()
                    .is_none_or(|p| p.role != now.role || p.epoch != now.epoch);
            // Traffic follows the router MAC: the bridges in front of the pair learn it from
            // the active's announcements, at once on becoming active and then every
            // ANNOUNCE_EVERY. A standby still forwards what reaches it (a bridge floods to it
            // the moment the active's port vanishes, which is what makes a kill -9 cost almost
            // nothing), and so sends from the shared MAC now and then, as does a stopped member
            // that resumes: a bridge may learn the MAC there, and the next announcement puts it
            // right. (Tried the other way in the lab: a standby that forwarded nothing lost up
            // to 5 messages per UDP flow on a kill -9, against none.)
            if now.role == flow_offload::wire::PairRole::Active
                && (became_active || last_announce.elapsed() >= ANNOUNCE_EVERY)
            {
                if let Some(a) = &id.announcer {
                    let frames =
                        router_mac_announcements(agent.model(), id.ports.iter().map(|(p, _)| *p));
                    if became_active {
                        tracing::info!(
                            epoch = now.epoch,
                            frames = frames.len(),
                            "active: announcing the router MAC on every port"
                        );
                    }
                    a.request(frames);
                    last_announce = Instant::now();
                }
            }
            if changed || last_pair_sent.elapsed() >= HEARTBEAT_EVERY {
                send(&mut stream, &codec, &Message::HaStatus(now.clone()))?;
                last_pair = Some(now);
                last_pair_sent = Instant::now();
            }
        }
        if last_counters.elapsed() >= COUNTERS_EVERY {
            let at = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let c = counters(agent, at);
            if !c.routes.is_empty() {
                send(&mut stream, &codec, &Message::Counters(c))?;
            }
            last_counters = Instant::now();
        }
        if last_rx.elapsed() >= HOST_TIMEOUT {
            return Err(LinkError::Timeout(HOST_TIMEOUT));
        }
    }
    // A restart into a new slot: the host hears it before the link closes.
    if let Some(im) = images {
        for st in im.drain() {
            send(&mut stream, &codec, &Message::Flash(st))?;
        }
    }
    Ok(())
}
