//! The FPM server: zebra connects to us (it is the TCP client), sends frames, and reads our
//! feedback frames on the same connection.
//!
//! # One zebra connection at a time
//! A connection is *alive* while its socket is open: zebra has not closed it, no read
//! failed, and its frames decode. While one is alive, any other connection is accepted
//! and closed at once ([`ServerEvent::Refused`], a WARN log with the peer's address,
//! [`FpmCounters::refused`]): it never replaces the live one, and it never reaches the
//! consumer as a new zebra. This is safe because zebra (`dplane_fpm_nl`) reconnects only
//! after it closed its previous socket (then retries every 3 s); when it restarts, the kernel
//! closes the old socket for it. Before refusing, the server reads what the live socket
//! already holds (without waiting, at most one receive buffer): a zebra whose last frames and
//! close were still unread (the consumer held the server back) has them delivered in order
//! and its close seen, and its reconnect is accepted, not refused. A peer that vanished
//! without closing (a remote host gone) is detected by TCP keepalive ([`KEEPALIVE_IDLE`],
//! then [`KEEPALIVE_PROBES`] probes [`KEEPALIVE_INTERVAL`] apart, about 25 s): until then
//! zebra's reconnects are refused and the routes stay as they are. The cost of the rule: a
//! local process that holds a connection open keeps zebra out (every attempt is logged and
//! counted) but cannot remove a route.
//!
//! Decoded events go to the consumer in batches through a bounded channel, which pushes back
//! on zebra when the consumer is slow. Each new connection is announced first with
//! [`ServerEvent::Connected`]: zebra then replays every route but keeps the offload flags it
//! had, so the consumer must re-acknowledge all. When the replay counts as over, and what it
//! may remove, is [`super::replay`]'s rule.
//!
//! # Errors are counted and logged, rate-limited
//! A byte stream that cannot be framed resets the connection ([`FpmCounters::frame_errors`]);
//! a netlink message or attribute that cannot be decoded drops that message
//! ([`DecodeStats::malformed`], [`DecodeStats::bad_attributes`]), which is then not counted
//! as received. Each is logged at WARN: the first [`ERROR_EXAMPLES`] of every
//! [`ERROR_WINDOW`] in full, the rest as one summary line with counts per kind when the
//! window is over.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flow_offload::status::OffloadStatus;
use nix::errno::Errno;
use nix::sys::socket::{sockopt, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::decode::{decode_netlink_with, DecodeErrorKind, DecodeStats, FpmEvent};
use super::feedback::FeedbackEncoder;
use super::frame::{FrameDecoder, FrameError};
use super::rib::ZebraRoute;

/// zebra's default FPM port.
pub const DEFAULT_PORT: u16 = 2620;

/// TCP keepalive on zebra's connection: idle time before the first probe...
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// ...time between probes...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// ...and unanswered probes after which the connection is dead.
pub const KEEPALIVE_PROBES: u32 = 3;

/// Framing and decode errors logged in full per [`ERROR_WINDOW`]; the rest are summarised.
pub const ERROR_EXAMPLES: u32 = 5;
/// The window of the decode errors' WARN budget.
pub const ERROR_WINDOW: Duration = Duration::from_secs(1);

/// Server settings.
#[derive(Debug, Clone)]
pub struct FpmConfig {
    /// Where to listen (default 127.0.0.1:2620).
    pub listen: SocketAddr,
    /// Most events per batch.
    pub batch_max: usize,
    /// Batches the consumer may fall behind before zebra is pushed back.
    pub channel_depth: usize,
    /// How feedback addresses tables.
    pub feedback: FeedbackEncoder,
}

impl Default for FpmConfig {
    fn default() -> FpmConfig {
        FpmConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            batch_max: 4096,
            channel_depth: 64,
            feedback: FeedbackEncoder::default(),
        }
    }
}

/// What the consumer receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// zebra (re)connected: it will replay everything; re-acknowledge every route. Sent only
    /// when no other connection is alive.
    Connected {
        /// zebra's address.
        peer: SocketAddr,
        /// Connection number, from 1.
        connection: u64,
    },
    /// Decoded events, in order.
    Events(Vec<FpmEvent>),
    /// The connection ended.
    Disconnected {
        /// Connection number.
        connection: u64,
        /// Why.
        reason: DisconnectReason,
    },
    /// Another connection arrived while `active` was alive: it was closed at once, and
    /// `active` goes on.
    Refused {
        /// Its address.
        peer: SocketAddr,
        /// The live connection's number.
        active: u64,
    },
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// zebra closed it.
    Closed,
    /// A read or write failed (the OS error's text).
    Io(String),
    /// The byte stream could not be framed any more.
    Framing(FrameError),
}

/// Server errors.
#[derive(Debug, thiserror::Error)]
pub enum FpmServerError {
    /// Could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server has stopped.
    #[error("the FPM server has stopped")]
    Stopped,
    /// A frame could not be encoded.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Counters, readable at any time for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FpmCounters {
    /// Connections accepted as zebra's.
    pub connections: u64,
    /// Connections refused because another one was alive.
    pub refused: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Netlink frames received.
    pub frames: u64,
    /// Frames of other types skipped.
    pub skipped_frames: u64,
    /// Connections reset for framing errors.
    pub frame_errors: u64,
    /// Per-message-type counters (received, ignored, and the dropped ones apart).
    pub messages: DecodeStats,
    /// The live zebra connection's number, if one is alive (its socket open).
    pub live: Option<u64>,
    /// Feedback frames written.
    pub feedback_frames: u64,
    /// Feedback buffers dropped because no zebra was connected.
    pub feedback_dropped: u64,
}

/// A handle to queue feedback for the current connection.
#[derive(Debug, Clone)]
pub struct FeedbackSender {
    tx: mpsc::Sender<Vec<u8>>,
    encoder: FeedbackEncoder,
}

impl FeedbackSender {
    /// Queue already-encoded FPM frames.
    pub async fn send_frames(&self, frames: Vec<u8>) -> Result<(), FpmServerError> {
        self.tx
            .send(frames)
            .await
            .map_err(|_| FpmServerError::Stopped)
    }

    /// Encode and queue acknowledgements (one frame each, written together).
    pub async fn ack<'a>(
        &self,
        acks: impl IntoIterator<Item = (&'a ZebraRoute, &'a OffloadStatus)>,
    ) -> Result<(), FpmServerError> {
        let mut buf = Vec::new();
        for (r, s) in acks {
            self.encoder.encode(r, s, &mut buf)?;
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.send_frames(buf).await
    }
}

/// The running server. Dropping it stops it.
#[derive(Debug)]
pub struct FpmServer {
    local: SocketAddr,
    counters: Arc<Mutex<FpmCounters>>,
    feedback: FeedbackSender,
    task: JoinHandle<()>,
}

impl Drop for FpmServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FpmCounters {
    /// Framing and decode errors by kind (the `kind` label of `dpucp_fpm_decode_errors_total`).
    pub fn decode_errors(&self) -> [(DecodeErrorKind, u64); 3] {
        [
            (DecodeErrorKind::Frame, self.frame_errors),
            (DecodeErrorKind::Message, self.messages.malformed),
            (DecodeErrorKind::Attribute, self.messages.bad_attributes),
        ]
    }
}

impl FpmServer {
    /// Listen and start serving; events arrive on the returned receiver.
    pub async fn start(
        config: FpmConfig,
    ) -> Result<(FpmServer, mpsc::Receiver<ServerEvent>), FpmServerError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| FpmServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local = listener
            .local_addr()
            .map_err(|source| FpmServerError::Bind {
                addr: config.listen,
                source,
            })?;
        let (events_tx, events_rx) = mpsc::channel(config.channel_depth.max(1));
        let (fb_tx, fb_rx) = mpsc::channel(1024);
        let counters = Arc::new(Mutex::new(FpmCounters::default()));
        let task = tokio::spawn(serve(
            listener,
            config.batch_max.max(1),
            events_tx,
            fb_rx,
            counters.clone(),
        ));
        tracing::info!(%local, "FPM server listening");
        Ok((
            FpmServer {
                local,
                counters,
                feedback: FeedbackSender {
                    tx: fb_tx,
                    encoder: config.feedback,
                },
                task,
            },
            events_rx,
        ))
    }

    /// The address actually bound (port 0 in the config picks one).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A handle for feedback.
    pub fn feedback(&self) -> FeedbackSender {
        self.feedback.clone()
    }

    /// Stop serving and wait until the socket is closed (dropping the server only requests it).
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> FpmCounters {
        *self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Conn {
    id: u64,
    read: tokio::net::tcp::OwnedReadHalf,
    writer: mpsc::UnboundedSender<Vec<u8>>,
    decoder: FrameDecoder,
    rbuf: Box<[u8]>,
}

const READ: usize = 256 * 1024;

fn bump(counters: &Mutex<FpmCounters>, f: impl FnOnce(&mut FpmCounters)) {
    f(&mut counters.lock().unwrap_or_else(PoisonError::into_inner));
}

async fn write_loop(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    counters: Arc<Mutex<FpmCounters>>,
) {
    while let Some(buf) = rx.recv().await {
        let frames = count_frames(&buf);
        if let Err(e) = w.write_all(&buf).await {
            tracing::warn!(error = %e, "FPM: feedback write failed");
            return;
        }
        bump(&counters, |c| c.feedback_frames += frames);
    }
}

fn count_frames(buf: &[u8]) -> u64 {
    let mut n = 0;
    let mut rest = buf;
    while let Ok(Some((_, len))) = super::frame::parse_header(rest) {
        n += 1;
        rest = rest.get(len..).unwrap_or(&[]);
    }
    n
}

/// The consumer dropped its receiver: the server stops.
struct Stopped;

/// The serving task's state (the listener and the feedback receiver are polled beside it).
struct Serve {
    batch_max: usize,
    events: mpsc::Sender<ServerEvent>,
    counters: Arc<Mutex<FpmCounters>>,
    /// zebra's connection, while alive.
    conn: Option<Conn>,
    next_id: u64,
    pending: Vec<FpmEvent>,
    /// The WARN budget of framing and decode errors.
    errors: crate::metrics::WarnLimiter,
}

impl Serve {
    /// Logs a framing or decode error at WARN within the budget (counted for the summary
    /// otherwise).
    fn error_seen(&mut self, kind: DecodeErrorKind, connection: u64, what: &dyn std::fmt::Display) {
        if self.errors.allow(std::time::Instant::now(), kind.as_str()) {
            match kind {
                DecodeErrorKind::Frame => tracing::warn!(connection, error = %what,
                    "FPM: framing error; resetting the connection"),
                _ => tracing::warn!(connection, kind = %kind.as_str(), error = %what,
                    "FPM: undecodable netlink message dropped"),
            }
        }
    }

    /// The summary line of the errors not logged in full, once their window is over.
    fn error_summary(&mut self) {
        if let Some(counts) = self.errors.summary(std::time::Instant::now()) {
            tracing::warn!(window = ?self.errors.window(), counts = %crate::metrics::format_counts(&counts),
                "FPM: more framing/decode errors than logged (see dpucp_fpm_decode_errors_total)");
        }
    }

    async fn send(&self, ev: ServerEvent) -> Result<(), Stopped> {
        self.events.send(ev).await.map_err(|_| Stopped)
    }

    /// A connection arrived: zebra's if none is alive, refused otherwise.
    async fn accepted(&mut self, stream: TcpStream, peer: SocketAddr) -> Result<(), Stopped> {
        self.end_if_closed().await?;
        if let Some(c) = &self.conn {
            let active = c.id;
            // Dropping the stream closes it: nothing was read, nothing reaches the consumer.
            drop(stream);
            bump(&self.counters, |k| k.refused += 1);
            tracing::warn!(%peer, active, "FPM: connection refused: zebra's connection is alive");
            return self.send(ServerEvent::Refused { peer, active }).await;
        }
        self.next_id += 1;
        let id = self.next_id;
        self.conn = Some(open(stream, id, self.counters.clone()));
        bump(&self.counters, |c| {
            c.connections += 1;
            c.live = Some(id);
        });
        tracing::info!(%peer, connection = id, "FPM: zebra connected");
        self.send(ServerEvent::Connected {
            peer,
            connection: id,
        })
        .await
    }

    /// Ends the live connection now if its peer has closed it. Reads what the socket already
    /// holds, without waiting and at most one receive buffer's worth, through the normal path
    /// ([`Serve::received`]): frames a peer sent before closing are delivered in order, then
    /// its close is seen. An open socket with nothing (more) buffered is alive; so is one
    /// still streaming when the budget is spent.
    async fn end_if_closed(&mut self) -> Result<(), Stopped> {
        let Some(c) = &self.conn else { return Ok(()) };
        let stream: &TcpStream = c.read.as_ref();
        let fd = stream.as_raw_fd();
        let mut budget = nix::sys::socket::getsockopt(stream, sockopt::RcvBuf).unwrap_or(READ);
        loop {
            let Some(c) = self.conn.as_mut() else {
                return Ok(()); // ended (a framing error)
            };
            let read = match nix::sys::socket::recv(fd, &mut c.rbuf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => Ok(n),
                // Open, nothing buffered: alive.
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => Err(std::io::Error::from(e)),
            };
            let got = match read {
                Ok(n) if n > 0 => n,
                // End of stream or an error: `received` ends the connection.
                _ => return self.received(read).await,
            };
            self.received(read).await?;
            budget = budget.saturating_sub(got);
            if budget == 0 {
                return Ok(()); // still streaming: alive
            }
        }
    }

    /// The result of a read on the live connection.
    async fn received(&mut self, read: std::io::Result<usize>) -> Result<(), Stopped> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        let reason = match read {
            Ok(0) => Some(DisconnectReason::Closed),
            Err(e) => Some(DisconnectReason::Io(e.to_string())),
            Ok(n) => {
                let id = c.id;
                c.decoder.extend(c.rbuf.get(..n).unwrap_or(&[]));
                let mut stats = DecodeStats::default();
                let mut frames = 0u64;
                let mut failed = None;
                // Dropped messages of this read (a handful get logged in full).
                let mut dropped: Vec<(DecodeErrorKind, String)> = Vec::new();
                while let Some(c) = self.conn.as_mut() {
                    match c.decoder.next_frame() {
                        Ok(Some(payload)) => {
                            frames += 1;
                            decode_netlink_with(payload, &mut self.pending, &mut stats, |e, t| {
                                if dropped.len() < ERROR_EXAMPLES as usize {
                                    dropped.push((e.kind(), format!("{e} (nlmsg_type {t})")));
                                }
                            });
                            if self.pending.len() >= self.batch_max {
                                let batch = std::mem::take(&mut self.pending);
                                self.events
                                    .send(ServerEvent::Events(batch))
                                    .await
                                    .map_err(|_| Stopped)?;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                let skipped = self.conn.as_ref().map_or(0, |c| c.decoder.skipped());
                bump(&self.counters, |k| {
                    k.bytes += n as u64;
                    k.frames += frames;
                    k.skipped_frames = skipped;
                    k.messages.add(&stats);
                    if failed.is_some() {
                        k.frame_errors += 1;
                    }
                });
                // Every dropped message counts against the budget; the first ones are shown.
                let (mut messages, mut attributes) = (stats.malformed, stats.bad_attributes);
                for (kind, text) in dropped {
                    match kind {
                        DecodeErrorKind::Attribute => attributes = attributes.saturating_sub(1),
                        _ => messages = messages.saturating_sub(1),
                    }
                    self.error_seen(kind, id, &text);
                }
                for (kind, n) in [
                    (DecodeErrorKind::Message, messages),
                    (DecodeErrorKind::Attribute, attributes),
                ] {
                    self.errors.suppressed(kind.as_str(), n);
                }
                failed.map(|e| {
                    self.error_seen(DecodeErrorKind::Frame, id, &e);
                    DisconnectReason::Framing(e)
                })
            }
        };
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            self.send(ServerEvent::Events(batch)).await?;
        }
        match reason {
            Some(reason) => self.end(reason).await,
            None => Ok(()),
        }
    }

    /// Closes the live connection (its writer stops when its channel is dropped).
    async fn end(&mut self, reason: DisconnectReason) -> Result<(), Stopped> {
        let Some(c) = self.conn.take() else {
            return Ok(());
        };
        bump(&self.counters, |k| k.live = None);
        tracing::info!(connection = c.id, ?reason, "FPM: connection ended");
        self.send(ServerEvent::Disconnected {
            connection: c.id,
            reason,
        })
        .await
    }
}

async fn serve(
    listener: TcpListener,
    batch_max: usize,
    events: mpsc::Sender<ServerEvent>,
    mut feedback: mpsc::Receiver<Vec<u8>>,
    counters: Arc<Mutex<FpmCounters>>,
) {
    let mut s = Serve {
        batch_max,
        events,
        counters,
        conn: None,
        next_id: 0,
        pending: Vec::new(),
        errors: crate::metrics::WarnLimiter::new(ERROR_EXAMPLES, ERROR_WINDOW),
    };
    let mut feedback_open = true;
    loop {
        let summary_at = s.errors.due().map(tokio::time::Instant::from_std);
        let step = tokio::select! {
            _ = async {
                match summary_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                s.error_summary();
                Ok(())
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => s.accepted(stream, peer).await,
                Err(e) => {
                    tracing::warn!(error = %e, "FPM: accept failed");
                    Ok(())
                }
            },
            read = async {
                match s.conn.as_mut() {
                    // Cancel-safe: bytes land in `rbuf` only when the read completes.
                    Some(c) => c.read.read(&mut c.rbuf).await,
                    None => std::future::pending().await,
                }
            } => s.received(read).await,
            fb = feedback.recv(), if feedback_open => {
                match fb {
                    None => feedback_open = false,
                    Some(buf) => match s.conn.as_ref() {
                        Some(c) if c.writer.send(buf).is_ok() => {}
                        _ => bump(&s.counters, |k| k.feedback_dropped += 1),
                    },
                }
                Ok(())
            }
        };
        if step.is_err() {
            return;
        }
    }
}

fn open(stream: TcpStream, id: u64, counters: Arc<Mutex<FpmCounters>>) -> Conn {
    let _ = stream.set_nodelay(true);
    keepalive(&stream);
    let (read, write) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(write_loop(write, rx, counters));
    Conn {
        id,
        read,
        writer: tx,
        decoder: FrameDecoder::new(),
        rbuf: vec![0u8; READ].into_boxed_slice(),
    }
}

/// TCP keepalive, so that a peer gone without closing stops counting as alive.
fn keepalive(stream: &TcpStream) {
    use nix::sys::socket::setsockopt;
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let set = setsockopt(stream, sockopt::KeepAlive, &true)
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepIdle, &secs(KEEPALIVE_IDLE)))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepInterval, &secs(KEEPALIVE_INTERVAL)))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES));
    if let Err(e) = set {
        tracing::warn!(error = %e, "FPM: cannot enable TCP keepalive on zebra's connection");
    }
}

/// In-process fakes of zebra (a plain TCP client): unit tests of the server's connection
/// handling, not of FRR (see `tests/fpm_frr*.rs` for the real daemons).
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::fpm::build::{self, NlWriter, RouteSpec};
    use crate::fpm::decode::{RouteKind, RouteNexthops, NLM_F_REQUEST};
    use crate::fpm::frame::encode_frame;
    use std::time::Duration;

    async fn start() -> (FpmServer, mpsc::Receiver<ServerEvent>) {
        FpmServer::start(FpmConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..FpmConfig::default()
        })
        .await
        .unwrap()
    }

    async fn next(rx: &mut mpsc::Receiver<ServerEvent>) -> ServerEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no event within 5 s")
            .expect("server stopped")
    }

    fn route_frame(prefix: &str) -> Vec<u8> {
        let nh = RouteNexthops::Id(1);
        let mut w = NlWriter::new();
        build::route(
            &mut w,
            true,
            NLM_F_REQUEST,
            &RouteSpec {
                table: 254,
                prefix: prefix.parse().unwrap(),
                protocol: 186,
                kind: RouteKind::Unicast,
                rtm_flags: 0,
                metric: None,
                nexthops: Some(&nh),
            },
        );
        let mut f = Vec::new();
        encode_frame(&w.buf, &mut f).unwrap();
        f
    }

    #[tokio::test]
    async fn unit_fake_zebra_events_feedback_and_refusal_of_a_second_connection() {
        let (server, mut rx) = start().await;
        let mut a = TcpStream::connect(server.local_addr()).await.unwrap();
        assert!(matches!(
            next(&mut rx).await,
            ServerEvent::Connected { connection: 1, .. }
        ));
        let mut bytes = route_frame("10.1.0.0/24");
        bytes.extend(route_frame("10.2.0.0/24"));
        a.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            match next(&mut rx).await {
                ServerEvent::Events(e) => got.extend(e),
                other => panic!("{other:?}"),
            }
        }
        // Feedback reaches the connected client as one frame per route.
        let route = ZebraRoute {
            table: 254,
            prefix: "10.1.0.0/24".parse().unwrap(),
            protocol: 186,
        };
        server
            .feedback()
            .ack([(&route, &OffloadStatus::Offloaded)])
            .await
            .unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), a.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf, [1, 1, 0, 48]);
        let mut rest = [0u8; 44];
        tokio::time::timeout(Duration::from_secs(5), a.read_exact(&mut rest))
            .await
            .unwrap()
            .unwrap();
        // A second client, while the first is alive, is closed at once; the first goes on.
        let mut b = TcpStream::connect(server.local_addr()).await.unwrap();
        let peer = b.local_addr().unwrap();
        assert_eq!(
            next(&mut rx).await,
            ServerEvent::Refused { peer, active: 1 }
        );
        let mut sink = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), b.read_to_end(&mut sink))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "refused: closed without a byte");
        a.write_all(&route_frame("10.3.0.0/24")).await.unwrap();
        match next(&mut rx).await {
            ServerEvent::Events(e) => assert_eq!(e.len(), 1),
            other => panic!("{other:?}"),
        }
        // Once the first has closed, the next connection is zebra's.
        drop(a);
        assert_eq!(
            next(&mut rx).await,
            ServerEvent::Disconnected {
                connection: 1,
                reason: DisconnectReason::Closed
            }
        );
        let _c = TcpStream::connect(server.local_addr()).await.unwrap();
        assert!(matches!(
            next(&mut rx).await,
            ServerEvent::Connected { connection: 2, .. }
        ));
        let c = server.counters();
        assert_eq!((c.connections, c.refused), (2, 1));
        assert_eq!((c.frames, c.messages.new_route), (3, 3));
        assert_eq!(c.feedback_frames, 1);
    }

    /// zebra closes and reconnects before the server has read the close (as after a restart
    /// while the consumer held the server back): the new connection is not refused.
    #[tokio::test]
    async fn unit_fake_zebra_reconnect_before_the_close_is_read_is_accepted() {
        let (server, mut rx) = FpmServer::start(FpmConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            channel_depth: 1,
            batch_max: 1,
            ..FpmConfig::default()
        })
        .await
        .unwrap();
        let mut a = TcpStream::connect(server.local_addr()).await.unwrap();
        assert!(matches!(next(&mut rx).await, ServerEvent::Connected { .. }));
        // Three events and a close, with nobody consuming: the server blocks on the channel.
        let mut bytes = route_frame("10.1.0.0/24");
        bytes.extend(route_frame("10.2.0.0/24"));
        bytes.extend(route_frame("10.3.0.0/24"));
        a.write_all(&bytes).await.unwrap();
        drop(a);
        let _b = TcpStream::connect(server.local_addr()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut seen = Vec::new();
        loop {
            match next(&mut rx).await {
                ServerEvent::Connected { connection, .. } => {
                    assert_eq!(connection, 2);
                    break;
                }
                ServerEvent::Refused { .. } => panic!("refused: {seen:?}"),
                other => seen.push(other),
            }
        }
        assert_eq!(
            seen.last(),
            Some(&ServerEvent::Disconnected {
                connection: 1,
                reason: DisconnectReason::Closed
            })
        );
        assert_eq!(server.counters().refused, 0);
    }

    /// The liveness check itself: an open socket is alive (what it held is delivered, in
    /// order), one its peer closed is ended at once, without waiting for the read loop.
    #[tokio::test]
    async fn unit_liveness_check_delivers_what_is_buffered_then_sees_the_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let counters = Arc::new(Mutex::new(FpmCounters::default()));
        let mut s = Serve {
            batch_max: 16,
            events: tx,
            counters: counters.clone(),
            conn: None,
            next_id: 1,
            pending: Vec::new(),
            errors: crate::metrics::WarnLimiter::new(ERROR_EXAMPLES, ERROR_WINDOW),
        };
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        s.conn = Some(open(stream, 1, counters.clone()));
        let sock: &TcpStream = s.conn.as_ref().unwrap().read.as_ref();
        assert!(nix::sys::socket::getsockopt(sock, sockopt::KeepAlive).unwrap());
        assert_eq!(
            nix::sys::socket::getsockopt(sock, sockopt::TcpKeepIdle).unwrap(),
            10
        );
        // Open and idle: alive, nothing sent to the consumer.
        assert!(s.end_if_closed().await.is_ok());
        assert!(s.conn.is_some());
        assert!(rx.try_recv().is_err());
        // Open with a frame buffered: alive, and the frame is delivered.
        client.write_all(&route_frame("10.1.0.0/24")).await.unwrap();
        let mut got = 0;
        for _ in 0..500 {
            assert!(s.end_if_closed().await.is_ok());
            assert!(s.conn.is_some());
            if let Ok(ServerEvent::Events(e)) = rx.try_recv() {
                got = e.len();
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(got, 1);
        // A frame and the close, both unread: the frame, then the end.
        client.write_all(&route_frame("10.2.0.0/24")).await.unwrap();
        drop(client);
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..500 {
            let _ = s.end_if_closed().await;
            if s.conn.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(s.conn.is_none(), "a closed socket is not alive");
        let mut after = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            after.push(ev);
        }
        assert!(
            matches!(
                &after[..],
                [
                    ..,
                    ServerEvent::Events(_),
                    ServerEvent::Disconnected {
                        connection: 1,
                        reason: DisconnectReason::Closed
                    }
                ]
            ),
            "{after:?}"
        );
        assert_eq!(counters.lock().unwrap().messages.new_route, 2);
    }

    #[tokio::test]
    async fn unit_fake_zebra_bad_framing_resets_and_feedback_without_zebra_is_dropped() {
        let (server, mut rx) = start().await;
        server
            .feedback()
            .send_frames(vec![1, 1, 0, 4])
            .await
            .unwrap();
        // Let the server see it before anyone connects.
        for _ in 0..500 {
            if server.counters().feedback_dropped == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut a = TcpStream::connect(server.local_addr()).await.unwrap();
        assert!(matches!(next(&mut rx).await, ServerEvent::Connected { .. }));
        a.write_all(&[1, 1, 0, 2]).await.unwrap();
        assert_eq!(
            next(&mut rx).await,
            ServerEvent::Disconnected {
                connection: 1,
                reason: DisconnectReason::Framing(FrameError::BadLength(2))
            }
        );
        let c = server.counters();
        assert_eq!((c.frame_errors, c.feedback_dropped), (1, 1));
        // zebra closing is reported too.
        let b = TcpStream::connect(server.local_addr()).await.unwrap();
        assert!(matches!(next(&mut rx).await, ServerEvent::Connected { .. }));
        drop(b);
        assert_eq!(
            next(&mut rx).await,
            ServerEvent::Disconnected {
                connection: 2,
                reason: DisconnectReason::Closed
            }
        );
    }
}
