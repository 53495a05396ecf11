//! Fetching chunks (in parallel, from any [`ChunkSource`]) into a [`SlotWriter`], and a small
//! TCP chunk protocol: [`ChunkServer`] and [`TcpChunkSource`].
//!
//! Wire protocol (all integers big-endian; one request at a time per connection, any number
//! of requests per connection):
//! ```text
//! request   40 bytes: "DPC1" | image id (32 bytes: SHA-256 of the manifest) | index u32
//!           index 0xFFFF_FFFF asks for the image prefix (header, manifest, signature)
//! response  status u8 | length u32 | length bytes
//!           status 0 ok, 1 unknown image, 2 no such chunk, 3 bad request
//! ```
//! The client bounds every length by what the manifest says (or the manifest limit for the
//! prefix), so a hostile server cannot make it allocate without bound; whatever it sends is
//! verified against the signed manifest before it reaches a slot.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

use crate::format::{
    FormatError, ImageView, Manifest, Sha256Digest, HEADER_LEN, MAX_MANIFEST_LEN, SIGNATURE_LEN,
};
use crate::format::{Image, VerifiedManifest};
use crate::slot::{Flashed, SlotError, SlotWriter};

/// Request magic (protocol version 1).
pub const REQUEST_MAGIC: [u8; 4] = *b"DPC1";
/// Request length.
pub const REQUEST_LEN: usize = 40;
/// The index that asks for the image prefix instead of a chunk.
pub const PREFIX_INDEX: u32 = u32::MAX;
/// Connections a [`ChunkServer`] serves at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;

const STATUS_OK: u8 = 0;
const STATUS_UNKNOWN_IMAGE: u8 = 1;
const STATUS_NO_SUCH_CHUNK: u8 = 2;
const STATUS_BAD_REQUEST: u8 = 3;

/// A chunk could not be fetched.
#[derive(Debug, Error)]
pub enum FetchError {
    /// Connecting to the server failed.
    #[error("connect {addr}: {source}")]
    Connect {
        /// Server address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The connection failed mid-request.
    #[error("fetching chunk {index}: {source}")]
    Io {
        /// Chunk index ([`PREFIX_INDEX`] for the prefix).
        index: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The server does not serve this image.
    #[error("server does not have image {0}")]
    UnknownImage(Sha256Digest),
    /// The server has no such chunk.
    #[error("server has no chunk {0}")]
    NoSuchChunk(u32),
    /// The server did not understand the request.
    #[error("server refused the request as malformed")]
    BadRequest,
    /// A status byte this client does not know.
    #[error("unknown response status {0}")]
    UnknownStatus(u8),
    /// The response announces more bytes than the item can have.
    #[error("response for {index} announces {len} bytes, at most {max} expected")]
    TooLong {
        /// Chunk index.
        index: u32,
        /// Announced length.
        len: u32,
        /// Limit.
        max: u64,
    },
    /// The prefix served is not a well-formed image prefix.
    #[error("bad image prefix from server: {0}")]
    BadPrefix(#[source] FormatError),
    /// The prefix served belongs to another image.
    #[error("server sent the manifest of another image")]
    WrongImage,
    /// The source cannot deliver this chunk (cancelled, offline, injected failure).
    #[error("chunk {0} unavailable from this source")]
    Unavailable(u32),
}

/// Where chunks come from: a TCP server, a local file, a test double.
pub trait ChunkSource: Send + Sync {
    /// The bytes of chunk `index`. They are verified by the caller; a source need not trust
    /// its transport.
    fn fetch(&self, index: u32) -> Result<Vec<u8>, FetchError>;
}

/// A local, in-memory image is a chunk source too (flashing from a file on the DPU).
impl ChunkSource for Image {
    fn fetch(&self, index: u32) -> Result<Vec<u8>, FetchError> {
        self.chunk(index)
            .map(<[u8]>::to_vec)
            .ok_or(FetchError::NoSuchChunk(index))
    }
}

/// Flash tuning.
#[derive(Debug, Clone, Copy)]
pub struct FlashOptions {
    /// Parallel fetch workers (at least 1).
    pub parallel: usize,
    /// Fetches of one chunk before a persistent mismatch fails the flash.
    pub max_attempts: u32,
}

impl Default for FlashOptions {
    fn default() -> Self {
        Self {
            parallel: 4,
            max_attempts: 3,
        }
    }
}

/// Progress, reported after every chunk written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashProgress {
    /// Chunks on the slot.
    pub done: u32,
    /// Chunks in the image.
    pub total: u32,
}

/// A completed flash.
#[derive(Debug, Clone)]
pub struct FlashReport {
    /// The verified slot.
    pub flashed: Flashed,
    /// Chunks that were already on the slot (resumed).
    pub resumed: u32,
    /// Fetches made (including re-fetches).
    pub fetches: u64,
    /// Re-fetches after a corrupt chunk.
    pub refetches: u64,
    /// Chunk writes to the slot (a rejected chunk is never written).
    pub written: u64,
    /// Chunks rejected by verification.
    pub rejected: u64,
}

/// A flash stopped. The journal holds what was written; opening a new writer resumes.
#[derive(Debug, Error)]
pub enum FlashError {
    /// A chunk could not be fetched.
    #[error("chunk {index}: {source}")]
    Fetch {
        /// Chunk index.
        index: u32,
        /// The cause.
        #[source]
        source: FetchError,
    },
    /// A chunk stayed corrupt over every attempt.
    #[error("chunk {index} corrupt in all {attempts} fetches")]
    Corrupt {
        /// Chunk index.
        index: u32,
        /// Attempts made.
        attempts: u32,
    },
    /// Writing, syncing or reading back the slot failed.
    #[error(transparent)]
    Slot(#[from] SlotError),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Flashes every missing chunk of `writer`'s image from `source` with `opts.parallel` workers,
/// then finishes with the read-back check. A helper thread advances the read-back hash in
/// chunk order while the workers fetch, so the final check is short.
pub fn flash(
    source: &dyn ChunkSource,
    writer: SlotWriter,
    opts: &FlashOptions,
    progress: &(dyn Fn(FlashProgress) + Sync),
) -> Result<FlashReport, FlashError> {
    let missing = writer.missing();
    let total = writer.manifest().manifest().chunk_count();
    let resumed = total - u32::try_from(missing.len()).unwrap_or(total);
    let cursor = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let workers_left = AtomicUsize::new(opts.parallel.max(1));
    let first_error: Mutex<Option<FlashError>> = Mutex::new(None);
    let fetches = AtomicU64::new(0);
    let refetches = AtomicU64::new(0);
    let done = AtomicU32::new(resumed);
    let max_attempts = opts.max_attempts.max(1);

    let fail = |e: FlashError| {
        let mut slot = lock(&first_error);
        if slot.is_none() {
            *slot = Some(e);
        }
        failed.store(true, Ordering::SeqCst);
    };

    let read_back = std::thread::scope(|s| {
        let w = &writer;
        let read_back = s.spawn(|| {
            w.read_back_follow(&|| {
                failed.load(Ordering::SeqCst) || workers_left.load(Ordering::SeqCst) == 0
            })
        });
        for _ in 0..opts.parallel.max(1) {
            s.spawn(|| {
                while !failed.load(Ordering::SeqCst) {
                    let k = cursor.fetch_add(1, Ordering::SeqCst);
                    let Some(&index) = missing.get(k) else { break };
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        fetches.fetch_add(1, Ordering::Relaxed);
                        let data = match source.fetch(index) {
                            Ok(d) => d,
                            Err(source) => {
                                fail(FlashError::Fetch { index, source });
                                break;
                            }
                        };
                        match w.write_chunk(index, &data) {
                            Ok(()) => {
                                let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                                progress(FlashProgress { done: d, total });
                                break;
                            }
                            Err(SlotError::ChunkRejected(_)) if attempts < max_attempts => {
                                refetches.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(SlotError::ChunkRejected(_)) => {
                                fail(FlashError::Corrupt { index, attempts });
                                break;
                            }
                            Err(e) => {
                                fail(e.into());
                                break;
                            }
                        }
                    }
                }
                workers_left.fetch_sub(1, Ordering::SeqCst);
            });
        }
        read_back.join()
    });

    if let Some(e) = lock(&first_error).take() {
        // Keep what landed for the resume; the original error matters more than this one.
        let _ = writer.checkpoint();
        return Err(e);
    }
    match read_back {
        Ok(r) => {
            r?;
        }
        Err(_) => {
            // The read-back thread panicked (it does not on any input); finish() re-reads.
        }
    }
    let stats = writer.stats();
    let flashed = writer.finish()?;
    Ok(FlashReport {
        flashed,
        resumed,
        written: stats.written,
        rejected: stats.rejected,
        fetches: fetches.into_inner(),
        refetches: refetches.into_inner(),
    })
}

/// Serves one image's chunks over TCP to any number of clients (up to [`MAX_CONNECTIONS`] at
/// once), one thread per connection, all reading the same shared [`Image`] buffer.
#[derive(Debug)]
pub struct ChunkServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Conns,
    accept: Option<JoinHandle<()>>,
}

/// Starting a [`ChunkServer`] failed.
#[derive(Debug, Error)]
#[error("chunk server on {addr}: {source}")]
pub struct ServeError {
    /// The address.
    pub addr: SocketAddr,
    /// The cause.
    #[source]
    pub source: io::Error,
}

impl ChunkServer {
    /// Binds `addr` (port 0 picks one) and starts serving `image`.
    pub fn start(addr: SocketAddr, image: Arc<Image>) -> Result<Self, ServeError> {
        let err = |source| ServeError { addr, source };
        let listener = TcpListener::bind(addr).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::new(Mutex::new(HashMap::new()));
        let (stop2, conns2) = (stop.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name("chunk-server".into())
            .spawn(move || accept_loop(&listener, &image, &stop2, &conns2))
            .map_err(err)?;
        Ok(Self {
            addr,
            stop,
            conns,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every connection and joins the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect(self.addr);
        for (_, c) in lock(&self.conns).drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ChunkServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

type Conns = Arc<Mutex<HashMap<u64, TcpStream>>>;

fn accept_loop(listener: &TcpListener, image: &Arc<Image>, stop: &AtomicBool, conns: &Conns) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut stream) = stream else { continue };
        threads.retain(|t| !t.is_finished());
        if threads.len() >= MAX_CONNECTIONS {
            continue; // dropped: closed
        }
        let _ = stream.set_nodelay(true);
        // A handle to every live connection, so stop() can shut them down.
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        lock(conns).insert(id, handle);
        let (image, conns2) = (image.clone(), conns.clone());
        let spawned = std::thread::Builder::new()
            .name("chunk-conn".into())
            .spawn(move || {
                let _ = serve_conn(&mut stream, &image);
                // shutdown() closes the connection even while other handles exist.
                let _ = stream.shutdown(Shutdown::Both);
                lock(&conns2).remove(&id);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(_) => {
                lock(conns).remove(&id);
            }
        }
    }
    for (_, c) in lock(conns).drain() {
        let _ = c.shutdown(Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
}

fn serve_conn(stream: &mut TcpStream, image: &Image) -> io::Result<()> {
    let mut req = [0u8; REQUEST_LEN];
    loop {
        match stream.read_exact(&mut req) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let index = u32::from_be_bytes([req[36], req[37], req[38], req[39]]);
        let (status, body): (u8, &[u8]) = if req[..4] != REQUEST_MAGIC {
            (STATUS_BAD_REQUEST, &[])
        } else if req[4..36] != image.id().0 {
            (STATUS_UNKNOWN_IMAGE, &[])
        } else if index == PREFIX_INDEX {
            (STATUS_OK, image.prefix())
        } else {
            match image.chunk(index) {
                Some(c) => (STATUS_OK, c),
                None => (STATUS_NO_SUCH_CHUNK, &[]),
            }
        };
        let len = u32::try_from(body.len()).unwrap_or(0);
        let mut head = [0u8; 5];
        head[0] = status;
        head[1..].copy_from_slice(&len.to_be_bytes());
        stream.write_all(&head)?;
        stream.write_all(body)?;
        if status == STATUS_BAD_REQUEST {
            return Ok(()); // out of sync: close
        }
    }
}

/// A [`ChunkSource`] over the TCP chunk protocol: a pool of connections, one per concurrent
/// caller (so one per flash worker), reconnecting when a connection fails.
#[derive(Debug)]
pub struct TcpChunkSource {
    addr: SocketAddr,
    image_id: Sha256Digest,
    chunk_size: u32,
    chunk_count: u32,
    timeout: Duration,
    pool: Mutex<Vec<TcpStream>>,
}

/// Default socket read/write timeout of [`TcpChunkSource`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn request(
    stream: &mut TcpStream,
    image_id: &Sha256Digest,
    index: u32,
    max: u64,
) -> Result<Vec<u8>, FetchError> {
    let io = |source| FetchError::Io { index, source };
    let mut req = [0u8; REQUEST_LEN];
    req[..4].copy_from_slice(&REQUEST_MAGIC);
    req[4..36].copy_from_slice(&image_id.0);
    req[36..].copy_from_slice(&index.to_be_bytes());
    stream.write_all(&req).map_err(io)?;
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).map_err(io)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    match head[0] {
        STATUS_OK => {}
        STATUS_UNKNOWN_IMAGE => return Err(FetchError::UnknownImage(*image_id)),
        STATUS_NO_SUCH_CHUNK => return Err(FetchError::NoSuchChunk(index)),
        STATUS_BAD_REQUEST => return Err(FetchError::BadRequest),
        s => return Err(FetchError::UnknownStatus(s)),
    }
    if u64::from(len) > max {
        return Err(FetchError::TooLong { index, len, max });
    }
    // Read straight into spare capacity: no zeroing pass over the chunk.
    let mut buf = Vec::with_capacity(len as usize);
    let got = (&mut *stream)
        .take(u64::from(len))
        .read_to_end(&mut buf)
        .map_err(io)?;
    if got != len as usize {
        return Err(FetchError::Io {
            index,
            source: io::ErrorKind::UnexpectedEof.into(),
        });
    }
    Ok(buf)
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, FetchError> {
    let err = |source| FetchError::Connect { addr, source };
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(err)?;
    s.set_nodelay(true).map_err(err)?;
    s.set_read_timeout(Some(timeout)).map_err(err)?;
    s.set_write_timeout(Some(timeout)).map_err(err)?;
    Ok(s)
}

/// Fetches the prefix (header, manifest, signature) of image `image_id` from a chunk server
/// and checks that the manifest is the one `image_id` names. Verify the result with
/// [`crate::format::verify_manifest`] before flashing.
pub fn fetch_manifest(
    addr: SocketAddr,
    image_id: &Sha256Digest,
) -> Result<(Vec<u8>, [u8; SIGNATURE_LEN]), FetchError> {
    let mut s = connect(addr, DEFAULT_TIMEOUT)?;
    let max = (HEADER_LEN + SIGNATURE_LEN) as u64 + u64::from(MAX_MANIFEST_LEN);
    let prefix = request(&mut s, image_id, PREFIX_INDEX, max)?;
    let view = ImageView::new_checked(&prefix).map_err(FetchError::BadPrefix)?;
    if Sha256Digest::of(view.manifest_bytes()) != *image_id {
        return Err(FetchError::WrongImage);
    }
    Ok((view.manifest_bytes().to_vec(), view.signature_bytes()))
}

impl TcpChunkSource {
    /// A source for the image `manifest` served at `addr`. Connections open lazily.
    pub fn new(addr: SocketAddr, manifest: &VerifiedManifest) -> Self {
        Self::for_manifest(addr, manifest.id(), manifest.manifest())
    }

    fn for_manifest(addr: SocketAddr, image_id: Sha256Digest, m: &Manifest) -> Self {
        Self {
            addr,
            image_id,
            chunk_size: m.chunk_size,
            chunk_count: m.chunk_count(),
            timeout: DEFAULT_TIMEOUT,
            pool: Mutex::new(Vec::new()),
        }
    }

    /// Socket timeouts (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl ChunkSource for TcpChunkSource {
    fn fetch(&self, index: u32) -> Result<Vec<u8>, FetchError> {
        if index >= self.chunk_count {
            return Err(FetchError::NoSuchChunk(index));
        }
        let max = u64::from(self.chunk_size);
        let pooled = lock(&self.pool).pop();
        // A pooled connection may have been closed by the server while idle: one retry on a
        // fresh connection. A failed connection is dropped, never returned to the pool.
        let (stream, data) = match pooled {
            Some(mut s) => match request(&mut s, &self.image_id, index, max) {
                Ok(d) => (s, d),
                Err(FetchError::Io { .. }) => {
                    let mut s = connect(self.addr, self.timeout)?;
                    let d = request(&mut s, &self.image_id, index, max)?;
                    (s, d)
                }
                Err(e) => return Err(e),
            },
            None => {
                let mut s = connect(self.addr, self.timeout)?;
                let d = request(&mut s, &self.image_id, index, max)?;
                (s, d)
            }
        };
        lock(&self.pool).push(stream);
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::boot::{BootState, SlotId};
    use crate::format::{build_image, verify_manifest, BuildParams};
    use crate::keys::TrustedKeys;
    use crate::slot::{Slot, SlotSet};
    use ed25519_dalek::SigningKey;

    fn image(len: usize, chunk: u32) -> (Arc<Image>, TrustedKeys) {
        let key = SigningKey::from_bytes(&[9; 32]);
        let payload: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let p = BuildParams {
            target: "t".into(),
            agent_version: "1".into(),
            chunk_size: chunk,
            created_unix: 0,
        };
        let img = Image::parse(build_image(&payload, &p, &key).unwrap()).unwrap();
        let mut t = TrustedKeys::default();
        t.add(key.verifying_key());
        (Arc::new(img), t)
    }

    #[test]
    fn tcp_flash_end_to_end_with_many_clients() {
        let (img, trust) = image(300_000, 4096);
        let server = ChunkServer::start("127.0.0.1:0".parse().unwrap(), img.clone()).unwrap();
        let addr = server.local_addr();
        let (mb, sig) = fetch_manifest(addr, &img.id()).unwrap();
        let vm = verify_manifest(&mb, &sig, &trust, Some("t")).unwrap();
        // Three DPUs flash concurrently from one server.
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        std::thread::scope(|s| {
            for d in &dirs {
                let vm = vm.clone();
                let img = &img;
                s.spawn(move || {
                    let slots = SlotSet {
                        a: Slot::file(d.path().join("a"), 1 << 20),
                        b: Slot::file(d.path().join("b"), 1 << 20),
                        state_dir: d.path().to_path_buf(),
                    };
                    let w =
                        SlotWriter::open(&slots, &BootState::new(SlotId::A), SlotId::B, vm.clone())
                            .unwrap();
                    let src = TcpChunkSource::new(addr, &vm);
                    let seen = AtomicU32::new(0);
                    let r = flash(&src, w, &FlashOptions::default(), &|p| {
                        seen.fetch_max(p.done, Ordering::SeqCst);
                    })
                    .unwrap();
                    assert_eq!(r.fetches, u64::from(vm.manifest().chunk_count()));
                    assert_eq!(seen.load(Ordering::SeqCst), vm.manifest().chunk_count());
                    let got = std::fs::read(d.path().join("b")).unwrap();
                    assert_eq!(&got[..img.payload().len()], img.payload());
                });
            }
        });
        server.stop();
    }

    #[test]
    fn tcp_errors_are_typed() {
        let (img, trust) = image(10_000, 1000);
        let server = ChunkServer::start("127.0.0.1:0".parse().unwrap(), img.clone()).unwrap();
        let addr = server.local_addr();
        let other = Sha256Digest([1; 32]);
        assert!(matches!(
            fetch_manifest(addr, &other),
            Err(FetchError::UnknownImage(_))
        ));
        let vm = img.verify(&trust, None).unwrap();
        let src = TcpChunkSource::new(addr, &vm);
        assert!(matches!(src.fetch(10), Err(FetchError::NoSuchChunk(10))));
        assert_eq!(src.fetch(9).unwrap(), img.chunk(9).unwrap());
        // A raw bad request is answered and the connection closed.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&[0u8; REQUEST_LEN]).unwrap();
        let mut head = [0u8; 5];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head[0], STATUS_BAD_REQUEST);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        server.stop();
        // Server gone: connect error.
        let src = TcpChunkSource::new(addr, &vm).with_timeout(Duration::from_secs(2));
        assert!(matches!(src.fetch(0), Err(FetchError::Connect { .. })));
    }

    #[test]
    fn pooled_connection_closed_by_server_is_replaced() {
        let (img, trust) = image(10_000, 1000);
        let vm = img.verify(&trust, None).unwrap();
        let server = ChunkServer::start("127.0.0.1:0".parse().unwrap(), img.clone()).unwrap();
        let addr = server.local_addr();
        let src = TcpChunkSource::new(addr, &vm);
        assert_eq!(src.fetch(0).unwrap(), img.chunk(0).unwrap());
        // The server restarts on the same address: the pooled connection is dead.
        server.stop();
        let server = ChunkServer::start(addr, img.clone()).unwrap();
        assert_eq!(src.fetch(1).unwrap(), img.chunk(1).unwrap());
        server.stop();
    }

    #[test]
    fn oversized_response_is_refused() {
        // A fake server that announces a 1 GiB chunk.
        let (img, trust) = image(10_000, 1000);
        let vm = img.verify(&trust, None).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; REQUEST_LEN];
            s.read_exact(&mut req).unwrap();
            s.write_all(&[0, 0x40, 0, 0, 0]).unwrap();
        });
        let src = TcpChunkSource::new(addr, &vm);
        assert!(matches!(
            src.fetch(0),
            Err(FetchError::TooLong {
                index: 0,
                max: 1000,
                ..
            })
        ));
        t.join().unwrap();
    }
}
