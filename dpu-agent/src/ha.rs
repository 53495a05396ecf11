//! The A/B pair runtime: NAT sessions replicated from the active DPU agent to its standby
//! over TCP, and the member's role fed from the host agent's leader-key outcomes.
//!
//! One thread per agent (the agent is synchronous: std threads, no async runtime) runs the pure
//! pieces of `flow_offload::ha` against the shared [`Pipeline`](flow_offload::soft::Pipeline):
//!
//! - [`RoleMachine`]: Standby until [`HaHandle::set_role`] says this member holds the leader
//!   key; Active while its lease is valid (minus the fencing margin); Fenced when it cannot
//!   vouch for it; Standby again `stand_down` after losing it. The pipeline's NAT allocation
//!   gate follows [`RoleMachine::may_allocate`] on every tick: a standby or fenced member drops
//!   new flows ([`DropReason::NatNotActive`](flow_offload::soft::DropReason::NatNotActive)) and
//!   keeps forwarding established ones.
//! - **Active** (and fenced, until it stands down): the NAT change log is on; every tick the
//!   thread drains it from the pipeline (locked briefly, at most [`DRAIN_CHUNK`] changes per
//!   lock), feeds the [`SyncSender`], and writes its batches, snapshot chunks and heartbeats as
//!   [`PairFrame`]s (postcard in `flow_offload::wire::frame` frames) to the peer, which it
//!   dials at `[ha] peer`. A keepalive pass re-sends, every `keepalive` period, each session
//!   that saw traffic since the previous pass (the change log does not record refreshes: see
//!   `flow_offload::soft::nat::ChangeLog`), so the standby's copies live as long as the
//!   originals. A change log overflow is counted and forces a snapshot (a heartbeat with
//!   `resync`).
//! - **Standby**: the change log is off; the thread accepts the active's connection on
//!   `[ha] sync_listen`, requests a snapshot on every (re)connection, feeds the
//!   [`SyncReceiver`], imports what it delivers into the pipeline (in version order:
//!   `import_ordered`; deletes remove), and answers acknowledgements. It reports Ready only
//!   once the snapshot is complete, the stream is applied up to its end, and every record
//!   imported (a record its pipeline refused, e.g. a NAT rule the host has not sent here yet,
//!   makes it ask for another snapshot later, with backoff).
//!
//! # Planned switchover
//! [`HaHandle::request_switchover`] (the host relays `dpuctl dpu switchover`) on the active of
//! that epoch takes the role machine's steps ([`flow_offload::ha::role`]); the phase shows in
//! [`HaStatus::switchover`]:
//! 1. **Waiting for the peer** to be Ready, allocation going on. The active counts its peer
//!    Ready only while connected, once the standby's snapshot on this connection has started,
//!    with the sync sender's view (snapshot end and stream
//!    acknowledged) *and* the standby's own [`StandbyReport`] agreeing: a standby acknowledges
//!    records its pipeline refused (a NAT rule it lacks), so acknowledgements alone do not
//!    prove it holds every binding.
//! 2. **Draining**: the allocation gate closes at once (new flows drop with `NatNotActive`;
//!    established sessions keep forwarding, and their changes keep streaming). The first time
//!    the change log is emptied (without loss) after the gate closed, the sender's last seq
//!    is the target: every binding created before the gate closed is at or below it. Once the
//!    peer has acknowledged up to the target, with no resync pending and the peer still
//!    Ready, the runtime feeds `SyncDrained`. With no traffic that is lag 0; changes of
//!    established sessions made after the target (state changes, deletions) do not hold the
//!    handover up: they keep streaming while fenced, until the new active takes over.
//! 3. **Released**: the machine fences the member (not preferred, still forwarding) and says
//!    `ReleaseLease`; [`HaStatus::release_lease`] asks the host to revoke the lease, until the
//!    member hears of a newer epoch or stands down (`stand_down_ns` after the release, to
//!    Standby, asking the new active for a snapshot).
//!
//! The peer dropping out of Ready while draining (disconnected, asking for a snapshot,
//! reporting a refused record), fencing, or `switchover_timeout_ns` passing abandon it
//! ([`SwitchoverPhase::Aborted`]): the gate opens again on the next tick if the member is
//! still active.
//!
//! Either member can be active, and the role can change at run time: the sender and receiver
//! are made afresh on every change of direction (a new receiver is seeded with the sessions its
//! table still holds, so that its first snapshot removes what the new active does not have).
//!
//! # Connections
//! The active dials, the standby accepts. Both send a [`PairHello`] first: a peer claiming the
//! same member letter (it would allocate from the same block), another protocol, or a stale
//! epoch is refused; so is a second active (split brain: each keeps its own block, so no
//! binding is handed out twice, and the lower epoch learns it is stale from the standby's
//! acknowledgements). After its hello the standby sends a [`StandbyReport`] (not Ready), and
//! another whenever that changes. A standby drops a connection that has been silent for
//! [`SILENCE_LIMIT`] (the active sends a heartbeat every second).
//!
//! # Security
//! The stream is plain TCP, unauthenticated: `[ha] sync_listen` must be a loopback address
//! (refused otherwise by the configuration). Every stream passes through
//! [`secure_sync_stream`], the one place where issue 13 will wrap it in mutual TLS with the
//! node identities.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flow_offload::ha::role::{
    Role, RoleAction, RoleConfig, RoleError, RoleEvent, RoleMachine, SwitchoverPhase as RolePhase,
};
use flow_offload::ha::sync::{
    Event, Heartbeat, ReadyState, Replicated, SnapshotSource, SyncConfig, SyncError, SyncMessage,
    SyncReceiver, SyncSender, Version,
};
use flow_offload::soft::nat::{NatSessionRecord, ReplicaCursor, ReplicatedSession};
use flow_offload::wire::frame::{FrameCodec, FrameReader};

use crate::agent::SharedPipeline;
use crate::config::{ConfigError, HaConfig};
pub use flow_offload::ha::link::{Member, PairFrame, PairHello, StandbyReport, PROTOCOL};

/// Change-log entries drained per pipeline lock.
pub const DRAIN_CHUNK: usize = 1024;
/// Session slots a keepalive pass visits per tick.
pub const KEEPALIVE_SLOTS: usize = 1024;
/// A standby drops a connection silent for this long.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(3);
/// Largest frame accepted from the peer (the fuzzed limit).
pub const MAX_FRAME: usize = flow_offload::ha::fuzz::PAIR_MAX_FRAME;
/// Largest backlog of unsent bytes before a connection is dropped (the peer does not read).
const MAX_OUT: usize = 32 << 20;
/// Redial delays of the active after a lost or refused connection, doubling.
const MIN_DIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_DIAL_BACKOFF: Duration = Duration::from_secs(2);
/// The thread's idle sleep.
const TICK: Duration = Duration::from_micros(500);
/// Role-machine time runs this far ahead of the pipeline clock, so that a lease deadline
/// converted from an `Instant` never saturates at 0.
const ROLE_OFFSET_NS: u64 = 3600 * 1_000_000_000;

/// Settings of the pair runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairSettings {
    /// This member.
    pub member: Member,
    /// Where the standby side listens (port 0: any, see [`HaRuntime::local_addr`]).
    pub sync_listen: SocketAddr,
    /// The peer's listen address.
    pub peer: SocketAddr,
    /// Change-log entries per NAT rule.
    pub change_log: usize,
    /// Period of the keepalive pass.
    pub keepalive: Duration,
    /// The replication stream's tuning.
    pub sync: SyncConfig,
    /// The role machine's timing. `margin_ns` is the fencing margin before the lease deadline
    /// [`HaHandle::set_role`] gives; `lease_ttl_ns` only converts that deadline and should be
    /// at least the etcd lease TTL (a longer lease is cut to it: this member then fences
    /// early unless renewed within `lease_ttl_ns - margin_ns`).
    pub role: RoleConfig,
}

impl PairSettings {
    /// From the `[ha]` section, with default tuning.
    pub fn from_config(c: &HaConfig) -> Result<PairSettings, ConfigError> {
        Ok(PairSettings {
            member: c.member,
            sync_listen: c.sync_listen_addr()?,
            peer: c.peer_addr()?,
            change_log: c.change_log,
            keepalive: Duration::from_secs(c.keepalive_secs),
            sync: SyncConfig::default(),
            role: RoleConfig {
                lease_ttl_ns: 60_000_000_000,
                ..RoleConfig::default()
            },
        })
    }
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// The listen socket.
    #[error("sync listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The sync tuning.
    #[error("{0}")]
    Sync(#[from] SyncError),
    /// The role timing.
    #[error("{0}")]
    Role(#[from] RoleError),
    /// The thread.
    #[error("cannot start the pair thread: {0}")]
    Thread(io::Error),
}

/// Counters of the runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaCounters {
    /// Connections established (hello exchanged).
    pub connects: u64,
    /// Connections lost or dropped.
    pub disconnects: u64,
    /// Connections refused (same member, protocol, stale epoch, second active).
    pub peers_refused: u64,
    /// Snapshots this member started serving (active).
    pub snapshots_served: u64,
    /// Snapshots this member asked for (standby): at start, on every (re)connection, when the
    /// active signals a resync, after refused records.
    pub snapshots_requested: u64,
    /// Changes pushed into the stream (active): change log plus keepalives.
    pub events_sent: u64,
    /// Keepalive records among them.
    pub keepalive_records: u64,
    /// Changes and records applied to the pipeline (standby).
    pub events_applied: u64,
    /// Records the pipeline refused (standby); each forces a later snapshot.
    pub import_errors: u64,
    /// Change log overflows (active); each forces a snapshot.
    pub change_log_overflows: u64,
    /// Changes the sender's queue refused (active); it asks for a snapshot itself.
    pub queue_full: u64,
    /// Acknowledgements of a newer term: another member is active (active).
    pub stale_term: u64,
    /// Frames that did not decode, or broke the framing.
    pub frame_errors: u64,
    /// Planned switchovers started ([`HaHandle::request_switchover`] while active in that
    /// epoch).
    pub switchovers_started: u64,
    /// Switchover requests ignored: this member was not active in the epoch named (or one was
    /// already under way).
    pub switchovers_ignored: u64,
    /// Switchovers that drained the stream and asked for the lease to be released.
    pub switchovers_released: u64,
    /// Switchovers abandoned (timeout, peer no longer Ready, fenced, newer epoch).
    pub switchovers_aborted: u64,
}

/// Where the last planned switchover of this member is (see [`HaStatus::switchover`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switchover {
    /// The epoch handing over.
    pub epoch: u64,
    /// How far it got.
    pub phase: SwitchoverPhase,
}

/// The steps of a planned switchover, as the runtime takes them (the role machine's
/// [`flow_offload::ha::role`] "Planned switchover" steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverPhase {
    /// Requested; the peer is not Ready (as its acknowledgements and its own report say).
    /// Allocation continues.
    WaitingForPeer,
    /// The peer is Ready: allocation is stopped (established sessions keep forwarding), and
    /// the runtime waits until the change log is empty and the sync sender's lag is 0.
    Draining,
    /// Every binding is acknowledged by the peer: this member is fenced (not preferred, still
    /// forwarding) and asks for its lease to be revoked ([`HaStatus::release_lease`]).
    Released,
    /// Abandoned; allocation resumes if this member is still active and its lease valid.
    Aborted(SwitchoverAbort),
}

/// Why a planned switchover was abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverAbort {
    /// Not done within the role machine's `switchover_timeout_ns`.
    Timeout,
    /// The peer dropped out of Ready while draining (disconnected, asked for a snapshot, or
    /// refused a record).
    PeerNotReady,
    /// This member fenced itself (lease deadline, or lease lost).
    Fenced,
    /// This member acquired a newer epoch.
    NewEpoch,
}

/// What the rest of the agent (metrics, `dpuctl dpus`) sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaStatus {
    /// This member.
    pub member: Member,
    /// Its role.
    pub role: Role,
    /// The newest epoch known: held by this member, or the active's.
    pub epoch: u64,
    /// Whether this member may create NAT bindings now.
    pub allocating: bool,
    /// Whether the sync connection is up.
    pub connected: bool,
    /// Standby: its replica is complete and caught up (a switchover may proceed). Active:
    /// the peer's replica is, as its acknowledgements and its own [`StandbyReport`] show
    /// (false while the sync connection is down).
    pub ready: bool,
    /// Changes not yet applied by the standby: on the active, pushed and not acknowledged; on
    /// the standby, announced by the active and not applied.
    pub lag_events: u64,
    /// Active: age of the oldest unacknowledged change. Standby: time since the active was
    /// last heard, while changes are outstanding (0 otherwise).
    pub lag_ms: u64,
    /// NAT sessions in this member's tables (on the standby: the synced sessions).
    pub sessions: usize,
    /// A planned switchover drained the sync stream (every binding acknowledged by the peer):
    /// "host, revoke my lease now". True from the role machine's `ReleaseLease` until this
    /// member's role leaves that epoch: a newer epoch is heard of (set_role, or a peer's
    /// hello), or it stands down to standby (`stand_down_ns` after the release).
    pub release_lease: bool,
    /// The last planned switchover requested of this member, with its epoch (kept after it
    /// completes or is abandoned, until the next request), for logs and metrics.
    pub switchover: Option<Switchover>,
    /// Counters.
    pub counters: HaCounters,
}

#[derive(Debug, Clone, Copy)]
struct RoleCommand {
    epoch: u64,
    active: bool,
    valid_until: Instant,
}

#[derive(Debug, Clone, Copy)]
enum Command {
    Role(RoleCommand),
    Switchover { epoch: u64 },
}

#[derive(Debug)]
struct Shared {
    commands: Mutex<Vec<Command>>,
    status: Mutex<HaStatus>,
    stop: AtomicBool,
}

/// The agent's handle on the pair runtime (cheap to clone, usable from any thread).
#[derive(Debug, Clone)]
pub struct HaHandle {
    shared: Arc<Shared>,
}

impl HaHandle {
    /// The host agent relays the leader key's outcome: `active` if this member holds the key
    /// of `epoch` (its revision) and its lease is valid until `lease_valid_until` (this host's
    /// clock; the member stops allocating the fencing margin before it); not `active` if
    /// another member holds `epoch` or nobody does. Epochs only grow: an older one is ignored.
    /// Takes effect within a tick (about a millisecond).
    pub fn set_role(&self, epoch: u64, active: bool, lease_valid_until: Instant) {
        self.shared
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Command::Role(RoleCommand {
                epoch,
                active,
                valid_until: lease_valid_until,
            }));
    }

    /// The host asks the active member of `epoch` to hand over (a planned switchover): once
    /// the peer is Ready, the member stops allocating (established sessions keep forwarding),
    /// waits until the peer has acknowledged every binding, then fences itself and sets
    /// [`HaStatus::release_lease`], for the host to revoke its lease so that the peer acquires
    /// a newer epoch. Ignored (logged, counted) unless this member is active in `epoch`, or
    /// while a switchover of `epoch` is under way. Abandoned after the role machine's
    /// `switchover_timeout_ns`, or when the peer drops out of Ready while draining: allocation
    /// then resumes. Takes effect within a tick, in order with [`HaHandle::set_role`].
    pub fn request_switchover(&self, epoch: u64) {
        self.shared
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Command::Switchover { epoch });
    }

    /// The runtime's state, for metrics.
    pub fn status(&self) -> HaStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The running pair runtime: stops its thread on [`HaRuntime::stop`] or drop.
#[derive(Debug)]
pub struct HaRuntime {
    handle: HaHandle,
    local: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl HaRuntime {
    /// Binds `sync_listen`, puts the pipeline's NAT tables in this member's block with
    /// allocation stopped (a member is Standby until [`HaHandle::set_role`]), and starts the
    /// thread. `clock` is the pipeline's time base ([`crate::agent::Agent::clock`]).
    pub fn start(
        settings: PairSettings,
        pipeline: SharedPipeline,
        clock: Instant,
    ) -> Result<HaRuntime, HaError> {
        settings.sync.validate()?;
        let role = RoleMachine::new(settings.role.clone())?;
        let listener =
            TcpListener::bind(settings.sync_listen).map_err(|source| HaError::Listen {
                addr: settings.sync_listen,
                source,
            })?;
        let local = listener.local_addr().map_err(|source| HaError::Listen {
            addr: settings.sync_listen,
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| HaError::Listen {
                addr: settings.sync_listen,
                source,
            })?;
        {
            let mut p = pipeline.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = p.set_nat_block(settings.member.block()) {
                tracing::warn!(error = %e, "a NAT rule cannot be split between the pair's members; it will not allocate");
            }
            p.set_nat_allocation(false);
            p.disable_nat_change_log();
        }
        let status = HaStatus {
            member: settings.member,
            role: Role::Standby,
            epoch: 0,
            allocating: false,
            connected: false,
            ready: false,
            lag_events: 0,
            lag_ms: 0,
            sessions: 0,
            release_lease: false,
            switchover: None,
            counters: HaCounters::default(),
        };
        let shared = Arc::new(Shared {
            commands: Mutex::new(Vec::new()),
            status: Mutex::new(status),
            stop: AtomicBool::new(false),
        });
        let wall_base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2));
        let mut worker = Worker {
            s: settings,
            pipe: pipeline,
            clock,
            wall_base,
            shared: shared.clone(),
            listener,
            role,
            leader_epoch: 0,
            allocating: false,
            mode: Mode::Receiver(Box::new(ReceiverState::placeholder())),
            conn: None,
            pending: Vec::new(),
            dialing: None,
            next_dial: Instant::now(),
            counters: HaCounters::default(),
            past_requests: 0,
            was_ready: false,
            last_warn: None,
            dial_backoff: MIN_DIAL_BACKOFF,
            switchover: None,
            drain_gate_closed: false,
            drain_target: None,
            released: None,
        };
        worker.become_receiver();
        tracing::info!(member = %worker.s.member, listen = %local, peer = %worker.s.peer,
            block = ?worker.s.member.block(), "pair runtime started: standby until the leader key says otherwise");
        let thread = std::thread::Builder::new()
            .name("ha-sync".into())
            .spawn(move || worker.run())
            .map_err(HaError::Thread)?;
        Ok(HaRuntime {
            handle: HaHandle { shared },
            local,
            thread: Some(thread),
        })
    }

    /// A handle for the rest of the agent.
    pub fn handle(&self) -> HaHandle {
        self.handle.clone()
    }

    /// The address the standby side listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops the thread (closing the sync connection) and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.handle.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the pair thread panicked");
            }
        }
    }
}

impl Drop for HaRuntime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Which end of the sync stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The active member, which dialled.
    Dialer,
    /// The standby, which accepted.
    Acceptor,
}

/// **The TLS hook.** Every sync stream passes through here right after it is connected or
/// accepted, before any byte is exchanged. Today it returns the plain TCP stream (which is
/// why the configuration confines `[ha] sync_listen` to loopback); issue 13 wraps it in mutual
/// TLS with the node identities here, the dialer verifying the peer member's certificate and
/// the acceptor requiring one.
pub fn secure_sync_stream(stream: TcpStream, side: Side) -> io::Result<TcpStream> {
    let _ = side;
    Ok(stream)
}

// --- the connection ------------------------------------------------------------------------

struct Conn {
    stream: TcpStream,
    reader: FrameReader,
    out: Vec<u8>,
    hello: Option<PairHello>,
    heard: Instant,
    opened: Instant,
    send_errors: u64,
    /// [`StandbyReport::ready`]: on the standby the value last sent, on the active the value
    /// last received (`None`: none yet).
    report: Option<bool>,
    /// Active: a snapshot was started for the standby on this connection (every standby asks
    /// for one on every connection). Until then the sender's view of the peer is the previous
    /// connection's.
    snapshot_started: bool,
}

impl Conn {
    fn new(stream: TcpStream, side: Side) -> io::Result<Conn> {
        let stream = secure_sync_stream(stream, side)?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        let now = Instant::now();
        Ok(Conn {
            stream,
            reader: FrameReader::new(FrameCodec::new(MAX_FRAME)),
            out: Vec::new(),
            hello: None,
            heard: now,
            opened: now,
            send_errors: 0,
            report: None,
            snapshot_started: false,
        })
    }

    /// Queues a frame; one that cannot be encoded (larger than [`MAX_FRAME`]: never with the
    /// sync tuning's batch and chunk sizes) is counted and dropped (the sender retransmits).
    fn send(&mut self, frame: &PairFrame) {
        if FrameCodec::new(MAX_FRAME)
            .encode(frame, &mut self.out)
            .is_err()
        {
            self.send_errors += 1;
        }
    }

    /// Reads what is available (at most `limit` bytes); `Ok(false)` when the peer closed.
    fn read_some(&mut self, limit: usize) -> io::Result<bool> {
        let mut buf = [0u8; 64 * 1024];
        let mut got = 0;
        while got < limit {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    got += n;
                    self.heard = Instant::now();
                    self.reader.push(buf.get(..n).unwrap_or(&[]));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes what the socket takes.
    fn flush(&mut self) -> io::Result<()> {
        let mut done = 0;
        while done < self.out.len() {
            match self.stream.write(self.out.get(done..).unwrap_or(&[])) {
                Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.drain(..done);
        if self.out.len() > MAX_OUT {
            return Err(io::Error::other("the peer does not read"));
        }
        Ok(())
    }
}

// --- the snapshot source -----------------------------------------------------------------------

/// The pipeline seen as a [`SnapshotSource`]: a walk over every NAT rule, locking the pipeline
/// once per chunk.
struct PipelineSource {
    pipe: SharedPipeline,
    cursor: ReplicaCursor,
    now_ns: u64,
    hint: u64,
}

impl SnapshotSource<ReplicatedSession> for PipelineSource {
    fn rewind(&mut self) {
        let p = self.pipe.lock().unwrap_or_else(PoisonError::into_inner);
        self.cursor = p.nat_replica_cursor();
        self.hint = p.nat_totals().0 as u64;
    }

    fn next_chunk(&mut self, max: usize, out: &mut Vec<ReplicatedSession>) -> bool {
        let p = self.pipe.lock().unwrap_or_else(PoisonError::into_inner);
        let start = out.len();
        // Bounded: at most 64 steps of at most `max` slots under one lock.
        for _ in 0..64 {
            let room = max.saturating_sub(out.len() - start);
            if room == 0 {
                return false;
            }
            if p.export_nat_replicas(&mut self.cursor, room, self.now_ns, out) {
                return true;
            }
        }
        false
    }

    fn len_hint(&self) -> Option<u64> {
        Some(self.hint)
    }
}

// --- the worker --------------------------------------------------------------------------------

struct SenderState {
    tx: SyncSender<ReplicatedSession>,
    source: PipelineSource,
    events: Vec<Event<ReplicatedSession>>,
    /// Last snapshot id the sender started (for a forced resync heartbeat).
    started_snapshot: u64,
    /// A change-log overflow not yet signalled to the standby.
    force_resync: bool,
    /// The term that learned (from the standby) that a newer active exists: do not dial
    /// again until this member's term grows.
    stale_at: Option<u64>,
    keepalive: Option<ReplicaCursor>,
    keepalive_start: u64,
    next_keepalive: u64,
    scratch: Vec<ReplicatedSession>,
}

struct ReceiverState {
    rx: Option<SyncReceiver<ReplicatedSession>>,
    /// Records the pipeline refused since the last snapshot request.
    failed: u64,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl ReceiverState {
    fn placeholder() -> ReceiverState {
        ReceiverState {
            rx: None,
            failed: 0,
            retry_at: None,
            backoff: Duration::from_secs(1),
        }
    }
}

enum Mode {
    Sender(Box<SenderState>),
    Receiver(Box<ReceiverState>),
}

struct Worker {
    s: PairSettings,
    pipe: SharedPipeline,
    clock: Instant,
    wall_base: u64,
    shared: Arc<Shared>,
    listener: TcpListener,
    role: RoleMachine,
    /// Newest epoch heard of (ours or the active's).
    leader_epoch: u64,
    /// The gate as last applied to the pipeline.
    allocating: bool,
    mode: Mode,
    conn: Option<Conn>,
    pending: Vec<Conn>,
    dialing: Option<mpsc::Receiver<io::Result<TcpStream>>>,
    next_dial: Instant,
    counters: HaCounters,
    /// Snapshot requests of receivers replaced since.
    past_requests: u64,
    was_ready: bool,
    last_warn: Option<Instant>,
    dial_backoff: Duration,
    /// The last planned switchover (published as is).
    switchover: Option<Switchover>,
    /// Draining: the allocation gate was closed for it (before the change log was drained).
    drain_gate_closed: bool,
    /// Draining: the sender's last seq when the change log was first emptied (without loss)
    /// after the gate closed. Every binding created before the gate closed has a seq at or
    /// below it; the drain is done once the peer acknowledged up to it.
    drain_target: Option<u64>,
    /// The epoch whose lease this member asked to be released (while that still stands).
    released: Option<u64>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The peer as the active sees it: not Ready while the connection is down or before the
/// standby asked for its snapshot on this connection (the sender's own view survives a lost
/// connection), nor while the standby reports that it is not.
fn peer_view(conn: Option<&Conn>, tx: &SyncSender<ReplicatedSession>) -> ReadyState {
    let lag = tx.last_seq() - tx.acked();
    match conn.filter(|c| c.hello.is_some()) {
        None => ReadyState::Syncing {
            received: 0,
            expected: None,
            lag,
        },
        Some(c) => match tx.peer_state() {
            ReadyState::Ready if c.report == Some(false) || !c.snapshot_started => {
                ReadyState::Syncing {
                    received: 0,
                    expected: None,
                    lag,
                }
            }
            state => state,
        },
    }
}

fn idle_of(r: &ReplicatedSession) -> u64 {
    match &r.session {
        NatSessionRecord::Napt44(s) => s.idle_ns,
        NatSessionRecord::Nat64(s) => s.idle_ns,
    }
}

impl Worker {
    /// The pipeline's clock.
    fn pipe_now(&self) -> u64 {
        ns(self.clock.elapsed())
    }

    /// The receiver's clock: wall time at start plus the monotonic clock, so that the snapshot
    /// ids of a restarted standby supersede its predecessor's.
    fn rx_now(&self) -> u64 {
        self.wall_base.saturating_add(self.pipe_now())
    }

    fn role_now(&self) -> u64 {
        ROLE_OFFSET_NS.saturating_add(self.pipe_now())
    }

    fn role_ns_of(&self, t: Instant) -> u64 {
        ROLE_OFFSET_NS.saturating_add(ns(t.saturating_duration_since(self.clock)))
    }

    fn run(mut self) {
        let mut published = Instant::now();
        self.publish();
        while !self.shared.stop.load(Ordering::SeqCst) {
            let busy = self.tick();
            if published.elapsed() >= Duration::from_millis(5) {
                self.publish();
                published = Instant::now();
            }
            if !busy {
                std::thread::sleep(TICK);
            }
        }
        if let Some(c) = self.conn.as_mut() {
            let _ = c.flush();
        }
        tracing::info!(member = %self.s.member, "pair runtime stopped");
    }

    /// One round; `true` if it moved anything (then the next round comes without sleeping).
    fn tick(&mut self) -> bool {
        self.take_commands();
        self.feed(RoleEvent::Tick(self.role_now()));
        self.follow_role();
        self.apply_gate();
        let busy = match self.mode {
            Mode::Sender(_) => self.sender_round(),
            Mode::Receiver(_) => self.receiver_round(),
        };
        self.switchover_round();
        self.check_release();
        busy
    }

    /// Puts the pipeline's NAT allocation gate where the role machine says.
    fn apply_gate(&mut self) {
        let allow = self.role.may_allocate(self.role_now());
        if allow != self.allocating {
            self.pipe
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set_nat_allocation(allow);
            self.allocating = allow;
            tracing::info!(member = %self.s.member, allocating = allow, role = ?self.role.role(), "NAT allocation gate");
        }
    }

    /// Feeds the role machine, carries out what it asks, and follows the switchover.
    fn feed(&mut self, event: RoleEvent) {
        let action = self.role.handle(event);
        match action {
            Some(RoleAction::DrainSync { epoch }) => {
                self.switchover = Some(Switchover {
                    epoch,
                    phase: SwitchoverPhase::Draining,
                });
                // Close the gate now, before the next drain of the change log: whatever is in
                // the log after that drain was created before this point.
                self.apply_gate();
                self.drain_gate_closed = !self.allocating;
                self.drain_target = None;
                tracing::info!(member = %self.s.member, epoch, "switchover: the peer is Ready; allocation stopped, draining the sync stream");
            }
            Some(RoleAction::ReleaseLease { epoch }) => {
                self.switchover = Some(Switchover {
                    epoch,
                    phase: SwitchoverPhase::Released,
                });
                self.released = Some(epoch);
                self.drain_gate_closed = false;
                self.drain_target = None;
                self.counters.switchovers_released += 1;
                tracing::info!(member = %self.s.member, epoch, "switchover: every binding acknowledged by the peer; fenced, forwarding; asking the host to release the lease");
            }
            None => {}
        }
        // A switchover the machine no longer has, and that did not complete: abandoned.
        let Some(so) = self.switchover else {
            return;
        };
        let running = matches!(
            so.phase,
            SwitchoverPhase::WaitingForPeer | SwitchoverPhase::Draining
        );
        if !running || self.role.switchover().is_some() {
            return;
        }
        let why = match (self.role.role(), event) {
            (Role::Active { epoch }, _) | (Role::Fenced { epoch }, _) if epoch > so.epoch => {
                SwitchoverAbort::NewEpoch
            }
            (Role::Fenced { .. } | Role::Standby, _) => SwitchoverAbort::Fenced,
            (Role::Active { .. }, RoleEvent::PeerSyncState(_)) => SwitchoverAbort::PeerNotReady,
            (Role::Active { .. }, _) => SwitchoverAbort::Timeout,
        };
        self.switchover = Some(Switchover {
            epoch: so.epoch,
            phase: SwitchoverPhase::Aborted(why),
        });
        self.drain_gate_closed = false;
        self.drain_target = None;
        self.counters.switchovers_aborted += 1;
        tracing::warn!(member = %self.s.member, epoch = so.epoch, reason = ?why, "switchover abandoned; allocation resumes if still active");
    }

    /// A switchover request from the host.
    fn request_switchover(&mut self, epoch: u64) {
        // The machine measures the timeout from its own clock: bring it up to now first.
        self.feed(RoleEvent::Tick(self.role_now()));
        let under_way = self
            .switchover
            .is_some_and(|so| so.epoch == epoch && self.role.switchover().is_some());
        if under_way {
            tracing::debug!(member = %self.s.member, epoch, "switchover already under way");
            return;
        }
        if self.role.role() != (Role::Active { epoch }) {
            self.counters.switchovers_ignored += 1;
            tracing::info!(member = %self.s.member, epoch, role = ?self.role.role(),
                "switchover request ignored: this member is not active in that epoch");
            return;
        }
        // The machine decides on the peer state it was last given: give it the live one (it
        // may hold one from an earlier term as active).
        let peer = match &self.mode {
            Mode::Sender(s) => peer_view(self.conn.as_ref(), &s.tx),
            Mode::Receiver(_) => ReadyState::Syncing {
                received: 0,
                expected: None,
                lag: 0,
            },
        };
        self.feed(RoleEvent::PeerSyncState(peer));
        let before = self.role.stats().switchovers_started;
        // With the peer Ready already, this returns DrainSync (and `feed` records Draining).
        self.feed(RoleEvent::SwitchoverRequested);
        if self.role.stats().switchovers_started == before {
            self.counters.switchovers_ignored += 1;
            tracing::info!(member = %self.s.member, epoch, "switchover request ignored by the role machine");
            return;
        }
        self.counters.switchovers_started += 1;
        if self.role.switchover() == Some(RolePhase::WaitingForPeer) {
            self.switchover = Some(Switchover {
                epoch,
                phase: SwitchoverPhase::WaitingForPeer,
            });
            tracing::info!(member = %self.s.member, epoch, "switchover requested: waiting for the peer to be Ready; allocation continues");
        }
    }

    /// The peer's state as the switchover needs it, fed to the role machine every round, and
    /// the drain check.
    fn switchover_round(&mut self) {
        let Mode::Sender(s) = &self.mode else {
            return;
        };
        let peer = peer_view(self.conn.as_ref(), &s.tx);
        // Acknowledged up to the target: changes of established sessions that come later keep
        // streaming (while fenced, too) but do not hold the handover up.
        let drained = self.drain_target.is_some_and(|t| s.tx.acked() >= t)
            && !s.tx.needs_resync()
            && !s.force_resync
            && peer.is_ready();
        self.feed(RoleEvent::PeerSyncState(peer));
        if self.role.switchover() == Some(RolePhase::Draining)
            && self.drain_gate_closed
            && !self.allocating
            && drained
        {
            self.feed(RoleEvent::SyncDrained);
        }
    }

    /// Withdraws the release request once this member's role has left that epoch.
    fn check_release(&mut self) {
        let Some(e) = self.released else {
            return;
        };
        if self.role.role() != (Role::Fenced { epoch: e }) || self.leader_epoch > e {
            self.released = None;
            tracing::info!(member = %self.s.member, epoch = e, role = ?self.role.role(), leader_epoch = self.leader_epoch,
                "switchover: this member left the epoch it released");
        }
    }

    fn take_commands(&mut self) {
        let cmds: Vec<Command> = std::mem::take(
            &mut *self
                .shared
                .commands
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for c in cmds {
            let c = match c {
                Command::Role(c) => c,
                Command::Switchover { epoch } => {
                    self.request_switchover(epoch);
                    continue;
                }
            };
            // The role machine wants the send time of the renewal: the lease is valid for one
            // TTL from it. From the deadline we are given, that is `valid_until - ttl`, but
            // never later than now (a lease longer than the configured TTL is then cut
            // short: fencing early is safe, late is not).
            let at_ns = self
                .role_ns_of(c.valid_until)
                .saturating_sub(self.s.role.lease_ttl_ns)
                .min(self.role_now());
            let held = self.role.epoch();
            let holding = matches!(self.role.role(), Role::Active { .. } | Role::Fenced { .. });
            let event = if c.active && c.epoch > held {
                Some(RoleEvent::LeaseAcquired {
                    epoch: c.epoch,
                    at_ns,
                })
            } else if c.active {
                Some(RoleEvent::LeaseRenewed {
                    epoch: c.epoch,
                    at_ns,
                })
            } else if holding && c.epoch >= held {
                Some(RoleEvent::LeaseLost { epoch: held })
            } else {
                None
            };
            if c.epoch >= self.leader_epoch {
                self.leader_epoch = c.epoch;
            }
            let before = self.role.role();
            if let Some(e) = event {
                self.feed(e);
            }
            if self.role.role() != before {
                tracing::info!(member = %self.s.member, epoch = c.epoch, active = c.active, from = ?before, to = ?self.role.role(), "role changed");
            }
        }
    }

    /// Switches between sender and receiver as the role requires.
    fn follow_role(&mut self) {
        let want_sender = match self.role.role() {
            Role::Active { epoch } | Role::Fenced { epoch } => Some(epoch),
            Role::Standby => None,
        };
        match (&mut self.mode, want_sender) {
            (Mode::Sender(s), Some(epoch)) => {
                if epoch > s.tx.term() && s.tx.start_term(epoch).is_ok() {
                    tracing::info!(member = %self.s.member, epoch, "sync stream continues under a new term");
                }
            }
            (Mode::Receiver(_), Some(epoch)) => self.become_sender(epoch),
            (Mode::Sender(_), None) => self.become_receiver(),
            (Mode::Receiver(_), None) => {}
        }
    }

    fn drop_connections(&mut self) {
        if self.conn.take().is_some() {
            self.counters.disconnects += 1;
        }
        self.pending.clear();
        self.dialing = None;
    }

    fn become_sender(&mut self, epoch: u64) {
        self.drop_connections();
        let tx = match SyncSender::new(self.s.sync.clone(), epoch) {
            Ok(tx) => tx,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the sync sender");
                return;
            }
        };
        {
            let mut p = self.pipe.lock().unwrap_or_else(PoisonError::into_inner);
            p.enable_nat_change_log(self.s.change_log);
            p.clear_nat_changes();
        }
        let now = self.pipe_now();
        self.mode = Mode::Sender(Box::new(SenderState {
            tx,
            source: PipelineSource {
                pipe: self.pipe.clone(),
                cursor: ReplicaCursor::default(),
                now_ns: now,
                hint: 0,
            },
            events: Vec::with_capacity(DRAIN_CHUNK),
            started_snapshot: 0,
            force_resync: false,
            stale_at: None,
            keepalive: None,
            keepalive_start: now,
            next_keepalive: now.saturating_add(ns(self.s.keepalive)),
            scratch: Vec::new(),
        }));
        self.next_dial = Instant::now();
        self.dial_backoff = MIN_DIAL_BACKOFF;
        tracing::info!(member = %self.s.member, epoch, peer = %self.s.peer, "sync: sending to the peer");
    }

    fn become_receiver(&mut self) {
        self.drop_connections();
        if let Mode::Receiver(r) = &self.mode {
            if let Some(rx) = &r.rx {
                self.past_requests += rx.stats().snapshots_requested;
            }
        }
        let mut rx = match SyncReceiver::new(self.s.sync.clone(), self.rx_now()) {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the sync receiver");
                return;
            }
        };
        // Seed with what the tables still hold (from an earlier role), so that the first
        // snapshot removes what the active does not have.
        let mut seeded = 0u64;
        {
            let mut p = self.pipe.lock().unwrap_or_else(PoisonError::into_inner);
            p.disable_nat_change_log();
        }
        let mut cursor = self
            .pipe
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .nat_replica_cursor();
        let mut buf = Vec::new();
        loop {
            let done = {
                let p = self.pipe.lock().unwrap_or_else(PoisonError::into_inner);
                p.export_nat_replicas(&mut cursor, 4096, self.pipe_now(), &mut buf)
            };
            for r in buf.drain(..) {
                rx.seed(r.key(), Version::default());
                seeded += 1;
            }
            if done {
                break;
            }
        }
        self.was_ready = false;
        self.mode = Mode::Receiver(Box::new(ReceiverState {
            rx: Some(rx),
            failed: 0,
            retry_at: None,
            backoff: Duration::from_secs(1),
        }));
        tracing::info!(member = %self.s.member, seeded, "sync: standby, waiting for the active's stream");
    }

    fn hello(&self, active: bool) -> PairFrame {
        let epoch = if active {
            self.role.epoch()
        } else {
            self.leader_epoch
        };
        PairFrame::Hello(PairHello {
            protocol: PROTOCOL,
            member: self.s.member,
            epoch,
            active,
        })
    }

    fn refuse(&mut self, why: &str, hello: Option<PairHello>) {
        self.counters.peers_refused += 1;
        if self.may_warn() {
            tracing::warn!(member = %self.s.member, ?hello, why, refused = self.counters.peers_refused,
                "sync connection refused (logged at most every 10 s)");
        }
    }

    /// Rate limit of the refusal warnings: one per 10 s.
    fn may_warn(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last_warn
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return false;
        }
        self.last_warn = Some(now);
        true
    }

    /// After a connection was lost or refused: dial again later, later each time.
    fn back_off(&mut self) {
        self.next_dial = Instant::now() + self.dial_backoff;
        self.dial_backoff = (self.dial_backoff * 2).min(MAX_DIAL_BACKOFF);
    }

    // --- active ------------------------------------------------------------------------------

    fn sender_round(&mut self) -> bool {
        let mut busy = false;
        // Incoming connections: the peer believes it is active too, or is stale.
        while let Ok((stream, addr)) = self.listener.accept() {
            drop(stream);
            self.refuse(
                "a peer dialled an active member (split brain or stale)",
                None,
            );
            tracing::debug!(%addr, "refused");
        }
        self.dial();
        let now = self.pipe_now();
        let Mode::Sender(s) = &mut self.mode else {
            return false;
        };
        // 1. The change log, in bounded chunks. While draining for a switchover, note whether
        // it was emptied after the allocation gate closed.
        let gate_closed = self.drain_gate_closed && !self.allocating;
        let mut emptied = false;
        for _ in 0..16 {
            let r = {
                let mut p = self.pipe.lock().unwrap_or_else(PoisonError::into_inner);
                p.drain_nat_changes(now, DRAIN_CHUNK, &mut s.events)
            };
            match r {
                Ok(n) => {
                    for e in s.events.drain(..) {
                        match s.tx.push(e) {
                            Ok(_) => self.counters.events_sent += 1,
                            Err(_) => self.counters.queue_full += 1,
                        }
                    }
                    busy |= n > 0;
                    if n < DRAIN_CHUNK {
                        emptied = true;
                        break;
                    }
                }
                Err(o) => {
                    self.counters.change_log_overflows += 1;
                    s.force_resync = true;
                    tracing::warn!(member = %self.s.member, lost = o.lost, "NAT change log overflowed: the standby gets a snapshot");
                    break;
                }
            }
        }
        if gate_closed && emptied && self.drain_target.is_none() {
            self.drain_target = Some(s.tx.last_seq());
        }
        let Some(conn) = self.conn.as_mut() else {
            return busy;
        };
        // 2. Keepalive pass (only while connected, and not while the queue is half full):
        // every session with traffic since the previous pass, once per period.
        let period = ns(self.s.keepalive);
        let queue_room = s.tx.last_seq() - s.tx.acked() < (self.s.sync.max_queue / 2) as u64;
        if queue_room && (s.keepalive.is_some() || now >= s.next_keepalive) {
            let p = self.pipe.lock().unwrap_or_else(PoisonError::into_inner);
            if s.keepalive.is_none() {
                s.keepalive = Some(p.nat_replica_cursor());
                s.keepalive_start = now;
            }
            let done = s.keepalive.as_mut().is_none_or(|cursor| {
                p.export_nat_replicas(cursor, KEEPALIVE_SLOTS, now, &mut s.scratch)
            });
            drop(p);
            if done {
                s.keepalive = None;
                s.next_keepalive = s.keepalive_start.saturating_add(period);
            }
            for r in s.scratch.drain(..) {
                if idle_of(&r) <= 2 * period {
                    if s.tx.push(Event::Upsert(r)).is_ok() {
                        self.counters.events_sent += 1;
                        self.counters.keepalive_records += 1;
                    } else {
                        self.counters.queue_full += 1;
                    }
                }
            }
        }
        // 3. Read the standby's answers.
        let alive = conn.read_some(1 << 20);
        loop {
            match conn.reader.next::<PairFrame>() {
                Ok(Some(PairFrame::Sync(m))) => {
                    busy = true;
                    let before = s.tx.stats().snapshots;
                    let req = match &m {
                        SyncMessage::SnapshotRequest(r) => Some(r.id),
                        _ => None,
                    };
                    if let Err(SyncError::StaleTerm { ours, theirs }) = s.tx.handle(m) {
                        self.counters.stale_term += 1;
                        s.stale_at = Some(ours);
                        tracing::warn!(member = %self.s.member, ours, theirs, "the standby follows a newer active: this member is stale");
                    }
                    if s.tx.stats().snapshots > before {
                        conn.snapshot_started = true;
                        self.counters.snapshots_served += 1;
                        s.started_snapshot = req.unwrap_or(s.started_snapshot);
                        s.force_resync = false;
                        {
                            let mut p = self.pipe.lock().unwrap_or_else(PoisonError::into_inner);
                            p.clear_nat_changes();
                        }
                        tracing::info!(member = %self.s.member, id = ?req, "serving a snapshot");
                    }
                }
                Ok(Some(PairFrame::Standby(r))) => {
                    if conn.report != Some(r.ready) {
                        tracing::info!(member = %self.s.member, ready = r.ready, "the standby reports its replica");
                    }
                    conn.report = Some(r.ready);
                }
                Ok(Some(PairFrame::Hello(h))) => {
                    if conn.hello.is_some()
                        || h.member == self.s.member
                        || h.active
                        || h.protocol != PROTOCOL
                    {
                        let why = if h.active {
                            "the peer is active too"
                        } else {
                            "bad hello"
                        };
                        self.conn = None;
                        self.counters.disconnects += 1;
                        self.refuse(why, Some(h));
                        self.back_off();
                        return true;
                    }
                    conn.hello = Some(h);
                    if h.epoch > self.leader_epoch {
                        self.leader_epoch = h.epoch;
                    }
                    self.counters.connects += 1;
                    self.dial_backoff = MIN_DIAL_BACKOFF;
                    tracing::info!(member = %self.s.member, peer = %h.member, "sync connection up (active side)");
                }
                Ok(None) => break,
                Err(e) if e.is_fatal() => {
                    self.counters.frame_errors += 1;
                    tracing::warn!(error = %e, "sync stream broken");
                    self.conn = None;
                    self.counters.disconnects += 1;
                    return true;
                }
                Err(_) => self.counters.frame_errors += 1,
            }
        }
        if s.stale_at.is_some_and(|t| t >= s.tx.term()) {
            self.conn = None;
            self.counters.disconnects += 1;
            return true;
        }
        // 4. Transmit: the live stream first, then the snapshot, then the heartbeat.
        if conn.hello.is_some() {
            let mut sent = 0;
            while conn.out.len() < MAX_OUT / 2 {
                let Some(b) = s.tx.poll_transmit(now) else {
                    break;
                };
                conn.send(&PairFrame::Sync(SyncMessage::Batch(b)));
                sent += 1;
            }
            s.source.now_ns = now;
            while conn.out.len() < MAX_OUT / 2 {
                let Some(m) = s.tx.poll_snapshot(&mut s.source, now) else {
                    break;
                };
                conn.send(&PairFrame::Sync(m));
                sent += 1;
            }
            if let Some(hb) = s.tx.poll_heartbeat(now) {
                conn.send(&PairFrame::Sync(SyncMessage::Heartbeat(hb)));
            }
            if s.force_resync {
                // Ask the standby for a new snapshot: the stream misses what the log lost.
                conn.send(&PairFrame::Sync(SyncMessage::Heartbeat(Heartbeat {
                    term: s.tx.term(),
                    last_seq: s.tx.last_seq(),
                    snapshot: s.started_snapshot,
                    resync: true,
                })));
                s.force_resync = false;
            }
            busy |= sent > 0;
        }
        let flushed = conn.flush();
        if !matches!(alive, Ok(true)) || flushed.is_err() {
            if conn.hello.is_some() {
                tracing::info!(member = %self.s.member, "sync connection lost (active side)");
            }
            self.conn = None;
            self.counters.disconnects += 1;
            self.back_off();
            return true;
        }
        busy
    }

    /// Dials the peer (one attempt at a time, in a helper thread so that a slow connect never
    /// holds up the change log).
    fn dial(&mut self) {
        if self.conn.is_some() {
            return;
        }
        if let Mode::Sender(s) = &self.mode {
            if s.stale_at.is_some_and(|t| t >= s.tx.term()) {
                return;
            }
        }
        if let Some(rx) = &self.dialing {
            match rx.try_recv() {
                Ok(Ok(stream)) => {
                    self.dialing = None;
                    match Conn::new(stream, Side::Dialer) {
                        Ok(mut c) => {
                            c.send(&self.hello(true));
                            // A reconnect: whatever was in flight is gone with the old
                            // connection; the standby asks for a snapshot anyway.
                            self.conn = Some(c);
                        }
                        Err(e) => tracing::warn!(error = %e, "sync connection setup failed"),
                    }
                }
                Ok(Err(e)) => {
                    self.dialing = None;
                    tracing::debug!(error = %e, peer = %self.s.peer, "peer not reachable");
                    self.next_dial = Instant::now() + Duration::from_millis(200);
                }
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => self.dialing = None,
            }
            return;
        }
        if Instant::now() < self.next_dial {
            return;
        }
        let (tx, rx) = mpsc::channel();
        let peer = self.s.peer;
        let spawned = std::thread::Builder::new()
            .name("ha-dial".into())
            .spawn(move || {
                let _ = tx.send(TcpStream::connect_timeout(&peer, Duration::from_secs(1)));
            });
        match spawned {
            Ok(_) => self.dialing = Some(rx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a dial");
                self.next_dial = Instant::now() + Duration::from_secs(1);
            }
        }
    }

    // --- standby -----------------------------------------------------------------------------

    fn receiver_round(&mut self) -> bool {
        let mut busy = false;
        // New connections wait for their hello.
        while let Ok((stream, _)) = self.listener.accept() {
            match Conn::new(stream, Side::Acceptor) {
                Ok(c) if self.pending.len() < 4 => self.pending.push(c),
                Ok(_) => self.refuse("too many connections waiting for a hello", None),
                Err(e) => tracing::warn!(error = %e, "sync connection setup failed"),
            }
        }
        let mut promoted = None;
        let mut i = 0;
        while i < self.pending.len() {
            let Some(c) = self.pending.get_mut(i) else {
                break;
            };
            let alive = matches!(c.read_some(64 * 1024), Ok(true));
            let first = c.reader.next::<PairFrame>();
            let expired = c.opened.elapsed() > SILENCE_LIMIT;
            match first {
                Ok(Some(PairFrame::Hello(h))) => {
                    let c = self.pending.swap_remove(i);
                    promoted = Some((c, h));
                    break;
                }
                Ok(None) if alive && !expired => i += 1,
                _ => {
                    self.pending.swap_remove(i);
                    self.counters.peers_refused += 1;
                }
            }
        }
        if let Some((mut c, h)) = promoted {
            let current = self
                .conn
                .as_ref()
                .and_then(|c| c.hello)
                .map_or(0, |h| h.epoch);
            let why = if h.protocol != PROTOCOL {
                Some("another protocol version")
            } else if h.member == self.s.member {
                Some("the peer has this member's letter (it would allocate from the same block)")
            } else if !h.active {
                Some("the peer is not active")
            } else if h.epoch < self.leader_epoch.max(current) {
                Some("the peer's epoch is stale")
            } else {
                None
            };
            match why {
                Some(why) => self.refuse(why, Some(h)),
                None => {
                    c.hello = Some(h);
                    self.leader_epoch = self.leader_epoch.max(h.epoch);
                    c.send(&self.hello(false));
                    // A new connection starts with a snapshot: not Ready until it is done.
                    c.send(&PairFrame::Standby(StandbyReport { ready: false }));
                    c.report = Some(false);
                    if self.conn.replace(c).is_some() {
                        self.counters.disconnects += 1;
                    }
                    self.counters.connects += 1;
                    if let Mode::Receiver(r) = &mut self.mode {
                        if let Some(rx) = r.rx.as_mut() {
                            rx.request_snapshot();
                        }
                        r.failed = 0;
                        r.retry_at = None;
                    }
                    self.was_ready = false;
                    tracing::info!(member = %self.s.member, peer = %h.member, epoch = h.epoch, "sync connection up (standby side): asking for a snapshot");
                    busy = true;
                }
            }
        }
        let rnow = self.rx_now();
        let pnow = self.pipe_now();
        let Mode::Receiver(r) = &mut self.mode else {
            return busy;
        };
        let Some(rx) = r.rx.as_mut() else {
            return busy;
        };
        if let Some(conn) = self.conn.as_mut() {
            let alive = matches!(conn.read_some(4 << 20), Ok(true));
            let mut frames = 0;
            loop {
                match conn.reader.next::<PairFrame>() {
                    Ok(Some(PairFrame::Sync(m))) => {
                        frames += 1;
                        let (delivered, answer) = rx.handle(m, rnow);
                        if !delivered.is_empty() {
                            let mut p = self.pipe.lock().unwrap_or_else(PoisonError::into_inner);
                            for d in &delivered {
                                match p.apply_nat_replica(&d.event, pnow) {
                                    Ok(()) => self.counters.events_applied += 1,
                                    Err(e) => {
                                        self.counters.import_errors += 1;
                                        r.failed += 1;
                                        if r.failed == 1 {
                                            tracing::warn!(member = %self.s.member, error = %e, "a synced NAT session was refused here; asking for another snapshot later");
                                        }
                                    }
                                }
                            }
                        }
                        if r.failed > 0 && conn.report != Some(false) {
                            // Before the acknowledgement of what was refused: the active must
                            // not count this replica complete on the strength of that ack.
                            conn.send(&PairFrame::Standby(StandbyReport { ready: false }));
                            conn.report = Some(false);
                        }
                        if let Some(a) = answer {
                            conn.send(&PairFrame::Sync(a));
                        }
                    }
                    Ok(Some(PairFrame::Hello(_) | PairFrame::Standby(_))) => {
                        self.counters.frame_errors += 1
                    }
                    Ok(None) => break,
                    Err(e) if e.is_fatal() => {
                        self.counters.frame_errors += 1;
                        tracing::warn!(error = %e, "sync stream broken");
                        break;
                    }
                    Err(_) => self.counters.frame_errors += 1,
                }
            }
            busy |= frames > 0;
            // Refused records: ask again once the snapshot is done, with backoff.
            if r.failed > 0 && rx.ready_state().is_ready() {
                let now = Instant::now();
                match r.retry_at {
                    None => r.retry_at = Some(now + r.backoff),
                    Some(t) if now >= t => {
                        rx.request_snapshot();
                        r.failed = 0;
                        r.retry_at = None;
                        r.backoff = (r.backoff * 2).min(Duration::from_secs(60));
                    }
                    Some(_) => {}
                }
            }
            if let Some(req) = rx.poll(rnow) {
                conn.send(&PairFrame::Sync(SyncMessage::SnapshotRequest(req)));
            }
            let ready = r.failed == 0 && rx.ready_state().is_ready();
            if conn.report != Some(ready) {
                conn.send(&PairFrame::Standby(StandbyReport { ready }));
                conn.report = Some(ready);
            }
            let silent = conn.heard.elapsed() > SILENCE_LIMIT;
            let flushed = conn.flush();
            if !alive || silent || flushed.is_err() || conn.reader.is_poisoned() {
                tracing::info!(member = %self.s.member, silent, "sync connection lost (standby side)");
                self.conn = None;
                self.counters.disconnects += 1;
                busy = true;
            }
        }
        let ready = r.failed == 0 && rx.ready_state().is_ready();
        if ready && !self.was_ready {
            r.backoff = Duration::from_secs(1);
            tracing::info!(member = %self.s.member, "standby Ready: replica complete and caught up");
        }
        self.was_ready = ready;
        busy
    }

    // --- status ------------------------------------------------------------------------------

    fn publish(&mut self) {
        let now = self.pipe_now();
        let sessions = self
            .pipe
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .nat_totals()
            .0;
        let connected = self.conn.as_ref().is_some_and(|c| c.hello.is_some());
        let requested = match &self.mode {
            Mode::Receiver(r) => r.rx.as_ref().map_or(0, |rx| rx.stats().snapshots_requested),
            Mode::Sender(_) => 0,
        };
        let (ready, lag_events, lag_ms) = match &self.mode {
            Mode::Sender(s) => {
                let lag = s.tx.lag(now);
                (
                    peer_view(self.conn.as_ref(), &s.tx).is_ready(),
                    lag.events,
                    lag.oldest_age_ns / 1_000_000,
                )
            }
            Mode::Receiver(r) => match r.rx.as_ref().map(|rx| rx.ready_state()) {
                Some(ReadyState::Syncing { lag, .. }) => {
                    let ms = self
                        .conn
                        .as_ref()
                        .filter(|_| lag > 0)
                        .map_or(0, |c| c.heard.elapsed().as_millis() as u64);
                    (false, lag, ms)
                }
                Some(ReadyState::Ready) => (r.failed == 0, 0, 0),
                None => (false, 0, 0),
            },
        };
        let status = HaStatus {
            member: self.s.member,
            role: self.role.role(),
            epoch: self.role.epoch().max(self.leader_epoch),
            allocating: self.allocating,
            connected,
            ready,
            lag_events,
            lag_ms,
            sessions,
            release_lease: self.released.is_some(),
            switchover: self.switchover,
            counters: HaCounters {
                frame_errors: self.counters.frame_errors
                    + self.conn.as_ref().map_or(0, |c| c.send_errors),
                snapshots_requested: self.past_requests + requested,
                ..self.counters.clone()
            },
        };
        *self
            .shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = status;
    }
}
