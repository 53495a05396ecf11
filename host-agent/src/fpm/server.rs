//! The FPM server: zebra connects to us (it is the TCP client), sends frames, and reads our
//! feedback frames on the same connection.
//!
//! One connection is active at a time: a new one replaces the old (zebra reconnecting after a
//! restart must not wait for a dead socket to time out). Decoded events go to the consumer in
//! batches through a bounded channel, which pushes back on zebra when the consumer is slow.
//! Each new connection is announced first with [`ServerEvent::Connected`]: zebra then replays
//! every route but keeps the offload flags it had, so the consumer must re-acknowledge all.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use flow_offload::status::OffloadStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::decode::{decode_netlink, DecodeStats, FpmEvent};
use super::feedback::FeedbackEncoder;
use super::frame::{FrameDecoder, FrameError};
use super::rib::ZebraRoute;

/// zebra's default FPM port.
pub const DEFAULT_PORT: u16 = 2620;

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
    /// zebra (re)connected: it will replay everything; re-acknowledge every route.
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
    /// A newer connection replaced it.
    Replaced,
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
    /// Connections accepted.
    pub connections: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Netlink frames received.
    pub frames: u64,
    /// Frames of other types skipped.
    pub skipped_frames: u64,
    /// Connections reset for framing errors.
    pub frame_errors: u64,
    /// Per-message-type counters (including malformed and ignored).
    pub messages: DecodeStats,
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

async fn serve(
    listener: TcpListener,
    batch_max: usize,
    events: mpsc::Sender<ServerEvent>,
    mut feedback: mpsc::Receiver<Vec<u8>>,
    counters: Arc<Mutex<FpmCounters>>,
) {
    let mut conn: Option<Conn> = None;
    let mut next_id = 0u64;
    let mut pending: Vec<FpmEvent> = Vec::new();
    let mut feedback_open = true;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "FPM: accept failed");
                        continue;
                    }
                };
                if let Some(old) = conn.take() {
                    tracing::info!(connection = old.id, "FPM: replaced by a new connection");
                    if events.send(ServerEvent::Disconnected {
                        connection: old.id, reason: DisconnectReason::Replaced,
                    }).await.is_err() { return; }
                }
                next_id += 1;
                conn = Some(open(stream, next_id, counters.clone()));
                bump(&counters, |c| c.connections += 1);
                tracing::info!(%peer, connection = next_id, "FPM: zebra connected");
                if events.send(ServerEvent::Connected { peer, connection: next_id }).await.is_err() {
                    return;
                }
            }
            read = async {
                match conn.as_mut() {
                    // Cancel-safe: bytes land in `rbuf` only when the read completes.
                    Some(c) => c.read.read(&mut c.rbuf).await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(c) = conn.as_mut() else { continue };
                let reason = match read {
                    Ok(0) => Some(DisconnectReason::Closed),
                    Err(e) => Some(DisconnectReason::Io(e.to_string())),
                    Ok(n) => {
                        c.decoder.extend(c.rbuf.get(..n).unwrap_or(&[]));
                        let mut stats = DecodeStats::default();
                        let mut frames = 0u64;
                        let mut failed = None;
                        loop {
                            match c.decoder.next_frame() {
                                Ok(Some(payload)) => {
                                    frames += 1;
                                    decode_netlink(payload, &mut pending, &mut stats);
                                    if pending.len() >= batch_max {
                                        let batch = std::mem::take(&mut pending);
                                        if events.send(ServerEvent::Events(batch)).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => { failed = Some(e); break; }
                            }
                        }
                        let skipped = c.decoder.skipped();
                        bump(&counters, |k| {
                            k.bytes += n as u64;
                            k.frames += frames;
                            k.skipped_frames = skipped;
                            k.messages.add(&stats);
                            if failed.is_some() { k.frame_errors += 1; }
                        });
                        failed.map(|e| {
                            tracing::warn!(error = %e, connection = c.id, "FPM: resetting the connection");
                            DisconnectReason::Framing(e)
                        })
                    }
                };
                if !pending.is_empty() {
                    let batch = std::mem::take(&mut pending);
                    if events.send(ServerEvent::Events(batch)).await.is_err() {
                        return;
                    }
                }
                if let Some(reason) = reason {
                    let id = c.id;
                    conn = None;
                    tracing::info!(connection = id, ?reason, "FPM: connection ended");
                    if events.send(ServerEvent::Disconnected { connection: id, reason }).await.is_err() {
                        return;
                    }
                }
            }
            fb = feedback.recv(), if feedback_open => {
                let Some(buf) = fb else { feedback_open = false; continue };
                match conn.as_ref() {
                    Some(c) if c.writer.send(buf).is_ok() => {}
                    _ => bump(&counters, |k| k.feedback_dropped += 1),
                }
            }
        }
    }
}

fn open(stream: TcpStream, id: u64, counters: Arc<Mutex<FpmCounters>>) -> Conn {
    let _ = stream.set_nodelay(true);
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
    async fn unit_fake_zebra_events_feedback_and_replacement() {
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
        // A second client replaces the first, which is closed.
        let _b = TcpStream::connect(server.local_addr()).await.unwrap();
        assert_eq!(
            next(&mut rx).await,
            ServerEvent::Disconnected {
                connection: 1,
                reason: DisconnectReason::Replaced
            }
        );
        assert!(matches!(
            next(&mut rx).await,
            ServerEvent::Connected { connection: 2, .. }
        ));
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), a.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 44, "the rest of the ack, then EOF");
        let c = server.counters();
        assert_eq!((c.connections, c.frames, c.messages.new_route), (2, 2, 2));
        assert_eq!(c.feedback_frames, 1);
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
