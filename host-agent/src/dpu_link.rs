//! The host side of one DPU link: keeps a DPU agent's model equal to the desired one.
//!
//! The link connects to the agent's listen address (retrying), reads its `Hello`, and decides
//! what to send:
//! - the whole desired model (`full`) when the agent restarted (its boot id changed, or it
//!   reports no epoch), or when its last epoch is not the one we saw acknowledged;
//! - otherwise only the difference between the acknowledged model and the desired one.
//!
//! Epochs increase across restarts of either side: the link continues from the larger of its
//! own count and the `last_epoch` the agent reports in its hello.
//!
//! The hello names the agent's link protocol: an agent speaking another one is refused
//! ([`Refusal::Incompatible`]), disconnected, and retried only every [`INCOMPATIBLE_RETRY`]. A
//! compatible one gets [`Message::HostHello`] before any batch.
//!
//! One batch is in flight at a time. Desired-state updates that arrive meanwhile are coalesced:
//! the next batch is the difference from what was acknowledged to the newest desired model. A
//! refused incremental batch is followed by a full one. A refused full batch is reported, and
//! nothing more is sent until the desired model changes. A batch the agent has not answered
//! after [`LinkConfig::batch_timeout`] (while it still sends heartbeats) is reported and resent
//! in full; an unanswered full batch ends the connection, and the reconnect starts over with a
//! hello. Heartbeats go both ways. An agent silent for [`LinkConfig::timeout`] is disconnected
//! and reconnected. A message from the agent that cannot be decoded is refused back to it
//! ([`Message::Refused`]) and reported, never skipped in silence.
//!
//! Image flashes ride the same connection: the link registers with the [`FlashHub`] while a
//! session lasts, forwards its flash orders, and hands the DPU's flash statuses and boot
//! reports back to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flow_offload::model::{Model, ObjectKey};
use flow_offload::status::OffloadStatus;
use flow_offload::wire::frame::{FrameCodec, FrameError, FrameReader};
use flow_offload::wire::{
    read_message, Apply, Counters, Features, HaRole, HaStatus, Hello, HostHello, Message, Refusal,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::flashing::FlashHub;

/// Timing of a link.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// An agent silent this long is disconnected.
    pub timeout: Duration,
    /// Wait between connection attempts.
    pub reconnect: Duration,
    /// A batch not answered this long (by an agent that is otherwise alive) is resent in full.
    pub batch_timeout: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            heartbeat: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            reconnect: Duration::from_millis(500),
            batch_timeout: Duration::from_secs(30),
        }
    }
}

/// The link's side of a pair member (see [`crate::pair`]): the roles to relay, and whether
/// the link is up (the member campaigns only while it is).
#[derive(Debug)]
pub struct PairLink {
    /// The newest role outcome.
    pub role: watch::Receiver<Option<HaRole>>,
    /// Set while a session with the agent is established.
    pub up: watch::Sender<bool>,
    /// Planned switchovers to start: the epoch the agent is active in.
    pub switchover: mpsc::Receiver<u64>,
    /// Set to the epoch whose lease the agent asks to release (its switchover is drained).
    pub release: watch::Sender<Option<u64>>,
}

/// Wait before reconnecting to an agent that speaks another link protocol (it will not change
/// until it is upgraded; retrying faster only fills the logs).
pub const INCOMPATIBLE_RETRY: Duration = Duration::from_secs(30);

/// What happened on a link, for the status store, FRR feedback and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum DpuEvent {
    /// Connected; the agent introduced itself.
    Connected {
        /// Its hello.
        hello: Hello,
        /// Whether it restarted since we last saw it (the whole model is being resent).
        restarted: bool,
    },
    /// A batch is in force on the DPU.
    Acked {
        /// The DPU.
        dpu: String,
        /// The batch.
        epoch: u64,
        /// Whether it was the whole model.
        full: bool,
        /// Status of every object the batch touched (all of them for a full batch).
        status: Vec<(ObjectKey, OffloadStatus)>,
    },
    /// The agent refused a message: a batch in flight (`batch`: its epoch and whether it was
    /// the whole model; nothing of it applied), or another message (`batch: None`).
    Refused {
        /// The DPU.
        dpu: String,
        /// The refused batch, if it was the one in flight.
        batch: Option<(u64, bool)>,
        /// Why.
        reason: Refusal,
    },
    /// This host refused a message from the agent (it could not be decoded, or an agent must
    /// not send it).
    RefusedFromDpu {
        /// The DPU.
        dpu: String,
        /// Why.
        reason: Refusal,
    },
    /// A batch was not answered within [`LinkConfig::batch_timeout`].
    Unanswered {
        /// The DPU.
        dpu: String,
        /// The batch.
        epoch: u64,
        /// Whether it was the whole model (the connection is then restarted).
        full: bool,
    },
    /// A pair member's state, as its agent reports it.
    Pair {
        /// The DPU.
        dpu: String,
        /// The report.
        status: HaStatus,
    },
    /// Route counters.
    Counters {
        /// The DPU.
        dpu: String,
        /// The counters.
        counters: Counters,
    },
    /// The connection ended (it is retried).
    Disconnected {
        /// The DPU, if it had said hello.
        dpu: Option<String>,
        /// Why.
        reason: String,
    },
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("agent silent for {0:?}")]
    Timeout(Duration),
    #[error("agent closed the connection")]
    Closed,
    #[error("first message was not a hello")]
    NoHello,
    #[error("agent speaks link protocol {theirs}, this host speaks {ours}")]
    Incompatible { ours: u16, theirs: u16 },
    #[error("configured as a pair member, but the agent has no [ha] section (no HA_PAIR feature)")]
    NotPairMember,
    #[error("full batch {epoch} not answered within {after:?}")]
    Unanswered { epoch: u64, after: Duration },
    #[error("shutdown")]
    Shutdown,
    #[error("event consumer gone")]
    NoConsumer,
}

/// What we know the DPU holds, across reconnects.
#[derive(Debug, Default)]
struct Known {
    boot_id: Option<u64>,
    epoch: u64,
    /// The model of the last acknowledged batch.
    acked: Option<(u64, Arc<Model>)>,
}

/// Runs the link to the agent at `addr` until `shutdown` turns true.
pub async fn run(
    addr: SocketAddr,
    cfg: LinkConfig,
    desired: watch::Receiver<Arc<Model>>,
    events: mpsc::Sender<DpuEvent>,
    shutdown: watch::Receiver<bool>,
    hub: Option<FlashHub>,
) {
    run_member(addr, cfg, desired, events, shutdown, hub, None).await;
}

/// [`run`] for a DPU that may be a pair member: relays `pair`'s roles and reports the link's
/// state to it.
pub async fn run_member(
    addr: SocketAddr,
    cfg: LinkConfig,
    mut desired: watch::Receiver<Arc<Model>>,
    events: mpsc::Sender<DpuEvent>,
    mut shutdown: watch::Receiver<bool>,
    hub: Option<FlashHub>,
    mut pair: Option<PairLink>,
) {
    let mut known = Known::default();
    loop {
        if *shutdown.borrow() {
            return;
        }
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                let mut dpu = None;
                let out = Outputs {
                    events: &events,
                    hub: hub.as_ref(),
                };
                let end = session(
                    stream,
                    cfg,
                    &mut desired,
                    out,
                    &mut shutdown,
                    &mut known,
                    &mut dpu,
                    pair.as_mut(),
                )
                .await;
                if let Some(p) = &pair {
                    p.up.send_replace(false);
                }
                let incompatible = matches!(
                    end,
                    SessionEnd::Incompatible { .. } | SessionEnd::NotPairMember
                );
                match end {
                    SessionEnd::Shutdown | SessionEnd::NoConsumer => return,
                    other => {
                        tracing::warn!(%addr, dpu = ?dpu, reason = %other, "DPU link ended");
                        let _ = events
                            .send(DpuEvent::Disconnected {
                                dpu,
                                reason: other.to_string(),
                            })
                            .await;
                    }
                }
                if incompatible {
                    tokio::select! {
                        _ = tokio::time::sleep(INCOMPATIBLE_RETRY) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
            Err(e) => tracing::debug!(%addr, error = %e, "DPU agent not reachable"),
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.reconnect) => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn send(stream: &mut TcpStream, codec: &FrameCodec, m: &Message) -> Result<(), SessionEnd> {
    let mut out = Vec::new();
    codec.encode(m, &mut out)?;
    stream.write_all(&out).await?;
    Ok(())
}

/// Where a session's news goes: link events, and flash news to the hub.
#[derive(Clone, Copy)]
struct Outputs<'a> {
    events: &'a mpsc::Sender<DpuEvent>,
    hub: Option<&'a FlashHub>,
}

struct InFlight {
    epoch: u64,
    full: bool,
    model: Arc<Model>,
    sent: Instant,
}

/// Sends the next batch if none is in flight and the DPU is behind.
async fn next_batch(
    stream: &mut TcpStream,
    codec: &FrameCodec,
    known: &mut Known,
    desired: &Arc<Model>,
    force_full: bool,
) -> Result<Option<InFlight>, SessionEnd> {
    let changes = match (&known.acked, force_full) {
        (Some((_, acked)), false) => {
            if Arc::ptr_eq(acked, desired) {
                return Ok(None);
            }
            // One ordered pass; an empty difference means the DPU is in step.
            match acked.changes_to(desired) {
                Some(c) if c.is_empty() => return Ok(None),
                other => other.map(|c| (false, c)),
            }
        }
        _ => None,
    };
    let (full, changes) = changes.unwrap_or_else(|| (true, desired.to_changes()));
    known.epoch += 1;
    let epoch = known.epoch;
    tracing::info!(epoch, full, changes = changes.len(), "sending batch to DPU");
    send(
        stream,
        codec,
        &Message::Apply(Apply {
            epoch,
            full,
            changes,
        }),
    )
    .await?;
    Ok(Some(InFlight {
        epoch,
        full,
        model: desired.clone(),
        sent: Instant::now(),
    }))
}

#[allow(clippy::too_many_arguments)]
async fn session(
    mut stream: TcpStream,
    cfg: LinkConfig,
    desired: &mut watch::Receiver<Arc<Model>>,
    out: Outputs<'_>,
    shutdown: &mut watch::Receiver<bool>,
    known: &mut Known,
    dpu: &mut Option<String>,
    pair: Option<&mut PairLink>,
) -> SessionEnd {
    match session_inner(&mut stream, cfg, desired, out, shutdown, known, dpu, pair).await {
        Ok(()) => SessionEnd::Shutdown,
        Err(e) => e,
    }
}

#[allow(clippy::too_many_arguments)]
async fn session_inner(
    stream: &mut TcpStream,
    cfg: LinkConfig,
    desired: &mut watch::Receiver<Arc<Model>>,
    out: Outputs<'_>,
    shutdown: &mut watch::Receiver<bool>,
    known: &mut Known,
    dpu: &mut Option<String>,
    mut pair: Option<&mut PairLink>,
) -> Result<(), SessionEnd> {
    let Outputs { events, hub } = out;
    stream.set_nodelay(true)?;
    let codec = FrameCodec::default();
    let mut reader = FrameReader::new(codec);
    let mut buf = vec![0u8; 256 * 1024];
    let mut last_rx = Instant::now();
    let mut heartbeat = tokio::time::interval(cfg.heartbeat);
    let mut seq = 0u64;

    // The hello comes first.
    let hello = loop {
        if let Some(m) = reader.next::<Message>()? {
            match m {
                Message::Hello(h) => break h,
                _ => return Err(SessionEnd::NoHello),
            }
        }
        let n = tokio::time::timeout(cfg.timeout, stream.read(&mut buf))
            .await
            .map_err(|_| SessionEnd::Timeout(cfg.timeout))??;
        if n == 0 {
            return Err(SessionEnd::Closed);
        }
        reader.push(buf.get(..n).unwrap_or(&[]));
    };
    *dpu = Some(hello.dpu_id.clone());
    if hello.protocol != PROTOCOL_VERSION {
        let (ours, theirs) = (PROTOCOL_VERSION, hello.protocol);
        let refusal = Message::Refused {
            epoch: None,
            reason: Refusal::Incompatible { ours, theirs },
        };
        send(stream, &codec, &refusal).await?;
        return Err(SessionEnd::Incompatible { ours, theirs });
    }
    if pair.is_some() && !hello.features.contains(Features::HA_PAIR) {
        let refusal = Message::Refused {
            epoch: None,
            reason: Refusal::Unexpected(
                "this DPU is configured as a pair member on the host, but its agent has no [ha] section"
                    .to_owned(),
            ),
        };
        send(stream, &codec, &refusal).await?;
        return Err(SessionEnd::NotPairMember);
    }
    let restarted = known.boot_id != Some(hello.boot_id)
        || hello.last_epoch.is_none()
        || hello.last_epoch != known.acked.as_ref().map(|(e, _)| *e);
    if restarted {
        known.acked = None;
    }
    known.boot_id = Some(hello.boot_id);
    // Resume numbering after the DPU's last epoch: after a restart of this host agent the
    // count starts again at zero, and a batch numbered at or below what the DPU last applied
    // would look like one it already has.
    if let Some(last) = hello.last_epoch {
        if last > known.epoch {
            tracing::info!(dpu = %hello.dpu_id, from = known.epoch, to = last, "resuming batch numbering after the DPU's last epoch");
            known.epoch = last;
        }
    }
    tracing::info!(dpu = %hello.dpu_id, version = %hello.agent_version, restarted, "DPU agent connected");
    events
        .send(DpuEvent::Connected {
            hello: hello.clone(),
            restarted,
        })
        .await
        .map_err(|_| SessionEnd::NoConsumer)?;
    let dpu_id = hello.dpu_id;
    let host_hello = Message::HostHello(HostHello {
        protocol: PROTOCOL_VERSION,
        features: Features::IMAGES,
    });
    send(stream, &codec, &host_hello).await?;
    if let Some(p) = pair.as_deref_mut() {
        // The role first (a standby must never allocate), then the member may campaign.
        let current = p.role.borrow_and_update().clone();
        if let Some(r) = current {
            send(stream, &codec, &Message::HaRole(r)).await?;
        }
        p.up.send_replace(true);
    }
    // Flash orders for this DPU, while this session lasts.
    let mut flash = hub.map(|h| (h, h.register(&dpu_id)));

    let current = desired.borrow_and_update().clone();
    let mut in_flight = next_batch(stream, &codec, known, &current, false).await?;
    loop {
        // Decode everything buffered.
        loop {
            let m = match reader.next_payload(read_message)? {
                Some(Ok(m)) => m,
                None => break,
                Some(Err((_, reason))) => {
                    refuse_dpu_message(stream, &codec, events, &dpu_id, reason).await?;
                    continue;
                }
            };
            match m {
                Message::Ack(ack) => {
                    let Some(f) = in_flight.take_if(|f| f.epoch == ack.epoch) else {
                        tracing::debug!(epoch = ack.epoch, "ack for no batch in flight");
                        continue;
                    };
                    known.acked = Some((f.epoch, f.model.clone()));
                    events
                        .send(DpuEvent::Acked {
                            dpu: dpu_id.clone(),
                            epoch: ack.epoch,
                            full: f.full,
                            status: ack.status,
                        })
                        .await
                        .map_err(|_| SessionEnd::NoConsumer)?;
                    let current = desired.borrow_and_update().clone();
                    in_flight = next_batch(stream, &codec, known, &current, false).await?;
                }
                Message::Refused { epoch, reason } => {
                    let f = in_flight.take_if(|f| Some(f.epoch) == epoch);
                    tracing::warn!(dpu = %dpu_id, ?epoch, batch = f.is_some(), %reason, "DPU refused a message");
                    events
                        .send(DpuEvent::Refused {
                            dpu: dpu_id.clone(),
                            batch: f.as_ref().map(|f| (f.epoch, f.full)),
                            reason,
                        })
                        .await
                        .map_err(|_| SessionEnd::NoConsumer)?;
                    if f.is_some_and(|f| !f.full) {
                        let current = desired.borrow_and_update().clone();
                        in_flight = next_batch(stream, &codec, known, &current, true).await?;
                    }
                }
                Message::HaStatus(status) => {
                    if status.handing_over {
                        if let Some(p) = pair.as_deref() {
                            if *p.release.borrow() != Some(status.epoch) {
                                tracing::info!(dpu = %dpu_id, epoch = status.epoch, "switchover drained: releasing the lease");
                                p.release.send_replace(Some(status.epoch));
                            }
                        }
                    }
                    events
                        .send(DpuEvent::Pair {
                            dpu: dpu_id.clone(),
                            status,
                        })
                        .await
                        .map_err(|_| SessionEnd::NoConsumer)?;
                }
                Message::Counters(counters) => {
                    events
                        .send(DpuEvent::Counters {
                            dpu: dpu_id.clone(),
                            counters,
                        })
                        .await
                        .map_err(|_| SessionEnd::NoConsumer)?;
                }
                Message::Heartbeat { .. } => {}
                Message::Flash(st) => match &flash {
                    Some((h, _)) => h.flash_status(&dpu_id, st),
                    None => tracing::debug!(dpu = %dpu_id, "flash status with no flash hub"),
                },
                Message::Boot(r) => {
                    tracing::info!(dpu = %dpu_id, running = %r.running, active = %r.active,
                        pending = ?r.pending, last = ?r.last, "DPU boot state");
                    if let Some((h, _)) = &flash {
                        h.boot_report(&dpu_id, r);
                    }
                }
                other @ (Message::Hello(_)
                | Message::Apply(_)
                | Message::FlashImage(_)
                | Message::HostHello(_)
                | Message::HaRole(_)
                | Message::HaSwitchover { .. }) => {
                    let reason = Refusal::Unexpected(format!("{} from a DPU", other.kind()));
                    refuse_dpu_message(stream, &codec, events, &dpu_id, reason).await?;
                }
            }
        }
        tokio::select! {
            r = stream.read(&mut buf) => {
                let n = r?;
                if n == 0 {
                    return Err(SessionEnd::Closed);
                }
                last_rx = Instant::now();
                reader.push(buf.get(..n).unwrap_or(&[]));
            }
            r = desired.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                if in_flight.is_none() {
                    let current = desired.borrow_and_update().clone();
                    in_flight = next_batch(stream, &codec, known, &current, false).await?;
                }
            }
            m = next_pair_message(&mut pair) => {
                if let Message::HaSwitchover { epoch } = &m {
                    tracing::info!(dpu = %dpu_id, epoch, "asking the DPU to hand over the pair's leadership");
                }
                send(stream, &codec, &m).await?;
            }
            Some(order) = next_order(&mut flash) => {
                tracing::info!(dpu = %dpu_id, port = order.server_port, "sending flash order");
                send(stream, &codec, &Message::FlashImage(order)).await?;
            }
            _ = heartbeat.tick() => {
                if last_rx.elapsed() > cfg.timeout {
                    return Err(SessionEnd::Timeout(cfg.timeout));
                }
                if let Some(f) = in_flight.take_if(|f| f.sent.elapsed() > cfg.batch_timeout) {
                    tracing::warn!(dpu = %dpu_id, epoch = f.epoch, full = f.full,
                        after_s = cfg.batch_timeout.as_secs(), "DPU did not answer a batch; resending the whole model");
                    events
                        .send(DpuEvent::Unanswered { dpu: dpu_id.clone(), epoch: f.epoch, full: f.full })
                        .await
                        .map_err(|_| SessionEnd::NoConsumer)?;
                    if f.full {
                        return Err(SessionEnd::Unanswered { epoch: f.epoch, after: cfg.batch_timeout });
                    }
                    let current = desired.borrow_and_update().clone();
                    in_flight = next_batch(stream, &codec, known, &current, true).await?;
                }
                seq += 1;
                send(stream, &codec, &Message::Heartbeat { seq }).await?;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return Ok(());
                }
            }
        }
    }
}

/// Refuses a message from the agent back to it, and reports it.
async fn refuse_dpu_message(
    stream: &mut TcpStream,
    codec: &FrameCodec,
    events: &mpsc::Sender<DpuEvent>,
    dpu: &str,
    reason: Refusal,
) -> Result<(), SessionEnd> {
    tracing::warn!(%dpu, %reason, "message from the DPU refused");
    let m = Message::Refused {
        epoch: None,
        reason: reason.clone(),
    };
    send(stream, codec, &m).await?;
    events
        .send(DpuEvent::RefusedFromDpu {
            dpu: dpu.to_owned(),
            reason,
        })
        .await
        .map_err(|_| SessionEnd::NoConsumer)
}

/// The next pair message for the agent: a new role to relay, or a switchover order. Never
/// when the DPU is not a pair member.
async fn next_pair_message(pair: &mut Option<&mut PairLink>) -> Message {
    let Some(p) = pair else {
        return std::future::pending().await;
    };
    let PairLink {
        role, switchover, ..
    } = &mut **p;
    loop {
        tokio::select! {
            r = role.changed() => match r {
                Ok(()) => {
                    if let Some(r) = role.borrow_and_update().clone() {
                        return Message::HaRole(r);
                    }
                }
                // The campaign ended (shutdown): nothing more to relay.
                Err(_) => std::future::pending::<()>().await,
            },
            Some(epoch) = switchover.recv() => return Message::HaSwitchover { epoch },
        }
    }
}

/// The next flash order, or never when there is no hub.
async fn next_order(
    flash: &mut Option<(&FlashHub, crate::flashing::LinkRegistration)>,
) -> Option<flow_offload::wire::FlashImage> {
    match flash {
        Some((_, reg)) => reg.orders.recv().await,
        None => std::future::pending().await,
    }
}
