//! Flashing DPU images through the DPU links.
//!
//! The [`FlashHub`] sits between the management API and the links. A flash request reads the
//! image once, checks it (structure, payload hashes, and the signature when the host has
//! trusted keys), starts one [`ChunkServer`] for it that every DPU flashing it shares, and sends
//! each DPU's link a [`FlashImage`] order, at most `parallel` DPUs at a time. The DPU verifies
//! the order again against its own keys and target, fetches the chunks, and reports
//! [`FlashStatus`] messages, which come back here and out as [`FlashEvent`]s. With `activate`,
//! the DPU restarts into the new slot and its next [`BootReport`] says whether the slot
//! committed or rolled back.
//!
//! One flash per DPU at a time: a second request for a DPU that is flashing is refused before
//! anything is sent (the DPU's slot lock refuses it as well, whoever asks).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use flow_offload::wire::{BootReport, FlashFailure, FlashImage, FlashPhase, FlashStatus};
use images::flash::ChunkServer;
use images::format::Image;
use images::keys::TrustedKeys;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, Semaphore};

/// `[images]` in the host agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesSection {
    /// Where chunk servers listen (`ip:port`, port 0: any). DPUs connect to the host end of
    /// their link, on the port the order names.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Public keys (files, or directories of `*.pub`): when set, images signed by anything
    /// else are refused here, before any DPU is asked. Each DPU checks its own keys anyway.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
}

fn default_listen() -> String {
    "127.0.0.1:0".to_owned()
}

impl Default for ImagesSection {
    fn default() -> Self {
        ImagesSection {
            listen: default_listen(),
            trusted_keys: Vec::new(),
        }
    }
}

/// Timeouts of a flash, as seen from the host.
#[derive(Debug, Clone, Copy)]
pub struct FlashTimeouts {
    /// No message from the DPU about this flash for this long: failed.
    pub idle: Duration,
    /// After a restart into the new slot: this long for the DPU's boot report.
    pub boot: Duration,
}

impl Default for FlashTimeouts {
    fn default() -> Self {
        FlashTimeouts {
            idle: Duration::from_secs(60),
            boot: Duration::from_secs(180),
        }
    }
}

/// A flash request (the API's, validated).
#[derive(Debug, Clone)]
pub struct FlashRequest {
    /// The image file, read by this process.
    pub image_path: PathBuf,
    /// The DPUs; empty with `all`: every connected DPU.
    pub dpus: Vec<String>,
    /// Every connected DPU.
    pub all: bool,
    /// DPUs flashed at once.
    pub parallel: usize,
    /// Fetch streams per DPU.
    pub streams: u8,
    /// Trial boots before a rollback.
    pub tries: u8,
    /// Restart into the new slot once armed.
    pub activate: bool,
}

/// Why a request was refused before any DPU was asked.
#[derive(Debug, thiserror::Error)]
pub enum FlashRequestError {
    /// The image file is unreadable or malformed.
    #[error("{0}")]
    Image(#[from] images::format::ImageError),
    /// The payload does not match the manifest, or the signature is not trusted.
    #[error("image {path}: {source}")]
    Verify {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: images::format::VerifyError,
    },
    /// A DPU named is not connected.
    #[error("DPU {0} is not connected")]
    NotConnected(String),
    /// No DPU is connected (with `all`).
    #[error("no DPU is connected")]
    NoDpus,
    /// A DPU named is flashing already.
    #[error("DPU {0} is already flashing an image")]
    Busy(String),
    /// The chunk server could not start.
    #[error("{0}")]
    Serve(#[from] images::flash::ServeError),
    /// `[images] listen` is not an address.
    #[error("images.listen: {0}")]
    Listen(String),
    /// The host's trusted keys could not be loaded.
    #[error("images.trusted_keys: {0}")]
    Keys(#[from] images::keys::KeyError),
}

/// One step of one DPU's flash, for the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashEvent {
    /// The DPU.
    pub dpu: String,
    /// The image id (hex).
    pub image_id: String,
    /// Where the DPU fetches from (`ip:port` as the host binds it).
    pub chunk_server: String,
    /// What happened.
    pub step: FlashStep,
}

/// The steps a flash goes through, as the API reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlashStep {
    /// The order is on its way to the DPU.
    Queued,
    /// The DPU's own phases.
    Dpu(FlashPhase),
    /// The DPU started again after `activate`, and reports its boot state.
    Booted(BootReport),
    /// The host gave up on this DPU (link lost, timeout).
    Lost(String),
}

/// What links report to the hub.
#[derive(Debug, Clone)]
enum LinkNews {
    Flash(FlashStatus),
    Boot(BootReport),
    Gone,
}

#[derive(Debug)]
struct Inner {
    section: ImagesSection,
    timeouts: FlashTimeouts,
    links: Mutex<HashMap<String, (u64, mpsc::UnboundedSender<FlashImage>)>>,
    next_session: Mutex<u64>,
    busy: Mutex<BTreeSet<String>>,
    boots: Mutex<BTreeMap<String, BootReport>>,
    news: broadcast::Sender<(String, LinkNews)>,
    servers: Mutex<HashMap<[u8; 32], Weak<ChunkServer>>>,
}

/// The flash coordinator shared by the API and the DPU links.
#[derive(Debug, Clone)]
pub struct FlashHub {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A link's registration; dropping it tells waiting flashes the link is gone.
#[derive(Debug)]
pub struct LinkRegistration {
    hub: FlashHub,
    dpu: String,
    session: u64,
    /// Orders for this DPU.
    pub orders: mpsc::UnboundedReceiver<FlashImage>,
}

impl Drop for LinkRegistration {
    fn drop(&mut self) {
        let mut links = lock(&self.hub.inner.links);
        if links
            .get(&self.dpu)
            .is_some_and(|(s, _)| *s == self.session)
        {
            links.remove(&self.dpu);
        }
        drop(links);
        let _ = self.hub.inner.news.send((self.dpu.clone(), LinkNews::Gone));
    }
}

impl FlashHub {
    /// A hub with these settings.
    pub fn new(section: ImagesSection, timeouts: FlashTimeouts) -> FlashHub {
        let (news, _) = broadcast::channel(4096);
        FlashHub {
            inner: Arc::new(Inner {
                section,
                timeouts,
                links: Mutex::new(HashMap::new()),
                next_session: Mutex::new(0),
                busy: Mutex::new(BTreeSet::new()),
                boots: Mutex::new(BTreeMap::new()),
                news,
                servers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A link session with `dpu` began; orders for it arrive on the registration.
    pub fn register(&self, dpu: &str) -> LinkRegistration {
        let session = {
            let mut n = lock(&self.inner.next_session);
            *n += 1;
            *n
        };
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.inner.links).insert(dpu.to_owned(), (session, tx));
        LinkRegistration {
            hub: self.clone(),
            dpu: dpu.to_owned(),
            session,
            orders: rx,
        }
    }

    /// A DPU reported on a flash.
    pub fn flash_status(&self, dpu: &str, st: FlashStatus) {
        let _ = self.inner.news.send((dpu.to_owned(), LinkNews::Flash(st)));
    }

    /// A DPU reported its boot state.
    pub fn boot_report(&self, dpu: &str, r: BootReport) {
        lock(&self.inner.boots).insert(dpu.to_owned(), r.clone());
        let _ = self.inner.news.send((dpu.to_owned(), LinkNews::Boot(r)));
    }

    /// The last boot report of `dpu`.
    pub fn boot_of(&self, dpu: &str) -> Option<BootReport> {
        lock(&self.inner.boots).get(dpu).cloned()
    }

    /// Starts a flash. Everything that can be refused is refused here, before any DPU is
    /// asked; then the events of every DPU's flash arrive on the returned channel, which
    /// closes when all of them have ended.
    pub async fn flash(
        &self,
        req: FlashRequest,
    ) -> Result<mpsc::Receiver<FlashEvent>, FlashRequestError> {
        let listen: SocketAddr = self
            .inner
            .section
            .listen
            .parse()
            .map_err(|e: std::net::AddrParseError| FlashRequestError::Listen(e.to_string()))?;
        // Who: checked before the image is read, so a typo costs nothing.
        let targets: Vec<String> = {
            let links = lock(&self.inner.links);
            if req.all {
                links.keys().cloned().collect()
            } else {
                for d in &req.dpus {
                    if !links.contains_key(d) {
                        return Err(FlashRequestError::NotConnected(d.clone()));
                    }
                }
                req.dpus.clone()
            }
        };
        if targets.is_empty() {
            return Err(FlashRequestError::NoDpus);
        }
        if let Some(d) = targets.iter().find(|d| lock(&self.inner.busy).contains(*d)) {
            return Err(FlashRequestError::Busy(d.clone()));
        }

        // The image: read once, checked once, shared by every DPU.
        let path = req.image_path.clone();
        let keys = self.inner.section.trusted_keys.clone();
        let image =
            tokio::task::spawn_blocking(move || -> Result<Arc<Image>, FlashRequestError> {
                let image = Image::read(&path)?;
                let verify = |source| FlashRequestError::Verify {
                    path: path.clone(),
                    source,
                };
                if keys.is_empty() {
                    image
                        .manifest()
                        .verify_payload(image.payload())
                        .map_err(verify)?;
                } else {
                    let trust = TrustedKeys::load_all(&keys)?;
                    image.verify(&trust, None).map_err(verify)?;
                }
                Ok(Arc::new(image))
            })
            .await
            .map_err(|e| {
                FlashRequestError::Image(images::format::ImageError::Io {
                    path: req.image_path.clone(),
                    source: std::io::Error::other(e),
                })
            })??;
        let image_id = image.id();

        // Claim the DPUs (re-checked under the lock: another request may have won meanwhile).
        {
            let mut busy = lock(&self.inner.busy);
            if let Some(d) = targets.iter().find(|d| busy.contains(*d)) {
                return Err(FlashRequestError::Busy(d.clone()));
            }
            busy.extend(targets.iter().cloned());
        }
        let claims: Vec<Claim> = targets
            .iter()
            .map(|d| Claim {
                hub: self.clone(),
                dpu: d.clone(),
            })
            .collect();
        // On error the claims are dropped, and with them the DPUs released.
        let server = self.chunk_server(listen, &image)?;
        let order = FlashImage {
            image_id: image_id.0,
            manifest: image.manifest_bytes().to_vec(),
            signature: image.signature().to_vec(),
            server_port: server.local_addr().port(),
            streams: req.streams.max(1),
            tries: req.tries.max(1),
            activate: req.activate,
        };
        tracing::info!(image = %image_id, path = %req.image_path.display(), dpus = ?targets,
            chunk_server = %server.local_addr(), bytes = image.as_bytes().len(), "flash requested");

        let (tx, rx) = mpsc::channel(1024);
        let sem = Arc::new(Semaphore::new(req.parallel.max(1)));
        let hub = self.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for claim in claims {
                let dpu = claim.dpu.clone();
                let (hub, sem, tx, order, server) = (
                    hub.clone(),
                    sem.clone(),
                    tx.clone(),
                    order.clone(),
                    server.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let ev = |step| FlashEvent {
                        dpu: dpu.clone(),
                        image_id: image_id.to_hex(),
                        chunk_server: server.local_addr().to_string(),
                        step,
                    };
                    let _ = tx.send(ev(FlashStep::Queued)).await;
                    let Ok(_permit) = sem.acquire().await else {
                        return;
                    };
                    hub.flash_one(&dpu, order, &tx, &ev).await;
                    drop(claim);
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            // Every DPU is done: the last reference to the chunk server goes with this task.
            drop(server);
        });
        Ok(rx)
    }

    fn chunk_server(
        &self,
        listen: SocketAddr,
        image: &Arc<Image>,
    ) -> Result<Arc<ChunkServer>, FlashRequestError> {
        let mut servers = lock(&self.inner.servers);
        servers.retain(|_, w| w.strong_count() > 0);
        if let Some(s) = servers.get(&image.id().0).and_then(Weak::upgrade) {
            return Ok(s);
        }
        let s = Arc::new(ChunkServer::start(listen, image.clone())?);
        servers.insert(image.id().0, Arc::downgrade(&s));
        Ok(s)
    }

    /// One DPU's flash: the order, then its statuses until the end.
    async fn flash_one(
        &self,
        dpu: &str,
        order: FlashImage,
        tx: &mpsc::Sender<FlashEvent>,
        ev: &(dyn Fn(FlashStep) -> FlashEvent + Sync),
    ) {
        let mut news = self.inner.news.subscribe();
        let sender = lock(&self.inner.links).get(dpu).map(|(_, s)| s.clone());
        let sent = sender.is_some_and(|s| s.send(order.clone()).is_ok());
        if !sent {
            let _ = tx
                .send(ev(FlashStep::Lost(
                    "the DPU's link went down before the order was sent".to_owned(),
                )))
                .await;
            return;
        }
        let mut rebooting = false;
        // After a restart, only a boot report from the next session counts (the old session
        // may still send one, for the slot just armed).
        let mut restarted = false;
        loop {
            let wait = if rebooting {
                self.inner.timeouts.boot
            } else {
                self.inner.timeouts.idle
            };
            let got = match tokio::time::timeout(wait, news.recv()).await {
                Err(_) => {
                    let what = if rebooting {
                        format!("no boot report within {wait:?} of the restart")
                    } else {
                        format!("no word from the DPU about the flash for {wait:?}")
                    };
                    let _ = tx.send(ev(FlashStep::Lost(what))).await;
                    return;
                }
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    tracing::warn!(dpu, missed = n, "flash events lagged");
                    continue;
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return,
                Ok(Ok(x)) => x,
            };
            let (from, news_item) = got;
            if from != dpu {
                continue;
            }
            match news_item {
                LinkNews::Flash(st) if st.image_id == order.image_id => {
                    let end = match &st.phase {
                        FlashPhase::Failed { .. } => true,
                        FlashPhase::Flashed { .. } => !order.activate,
                        FlashPhase::Rebooting { .. } => {
                            rebooting = true;
                            false
                        }
                        _ => false,
                    };
                    let _ = tx.send(ev(FlashStep::Dpu(st.phase))).await;
                    if end {
                        return;
                    }
                }
                LinkNews::Flash(_) => {}
                LinkNews::Boot(r) if restarted => {
                    let _ = tx.send(ev(FlashStep::Booted(r))).await;
                    return;
                }
                LinkNews::Boot(_) => {}
                LinkNews::Gone if !rebooting => {
                    let _ = tx
                        .send(ev(FlashStep::Lost(
                            "the DPU's link went down during the flash; the DPU keeps what it \
                             wrote, and flashing the same image again resumes"
                                .to_owned(),
                        )))
                        .await;
                    return;
                }
                LinkNews::Gone => restarted = true,
            }
        }
    }
}

/// A DPU claimed by a request: released when its flash ends (or the request fails first).
struct Claim {
    hub: FlashHub,
    dpu: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.hub.inner.busy).remove(&self.dpu);
    }
}

/// A failure class's name in the API.
pub fn failure_str(f: FlashFailure) -> &'static str {
    match f {
        FlashFailure::NotConfigured => "not_configured",
        FlashFailure::Busy => "busy",
        FlashFailure::Refused => "refused",
        FlashFailure::Fetch => "fetch",
        FlashFailure::Corrupt => "corrupt",
        FlashFailure::Slot => "slot",
        FlashFailure::Boot => "boot",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn hub() -> FlashHub {
        FlashHub::new(ImagesSection::default(), FlashTimeouts::default())
    }

    fn req(dpus: &[&str], path: &str) -> FlashRequest {
        FlashRequest {
            image_path: path.into(),
            dpus: dpus.iter().map(|s| (*s).to_owned()).collect(),
            all: false,
            parallel: 1,
            streams: 1,
            tries: 1,
            activate: false,
        }
    }

    #[tokio::test]
    async fn unit_refusals_before_the_image_is_read() {
        let h = hub();
        assert!(matches!(
            h.flash(req(&["d1"], "/nonexistent")).await,
            Err(FlashRequestError::NotConnected(d)) if d == "d1"
        ));
        let mut all = req(&[], "/nonexistent");
        all.all = true;
        assert!(matches!(h.flash(all).await, Err(FlashRequestError::NoDpus)));
        let _reg = h.register("d1");
        assert!(matches!(
            h.flash(req(&["d1"], "/nonexistent")).await,
            Err(FlashRequestError::Image(_))
        ));
        // A failed request leaves nothing claimed.
        assert!(lock(&h.inner.busy).is_empty());
        lock(&h.inner.busy).insert("d1".into());
        assert!(matches!(
            h.flash(req(&["d1"], "/nonexistent")).await,
            Err(FlashRequestError::Busy(d)) if d == "d1"
        ));
    }

    #[tokio::test]
    async fn unit_a_dropped_registration_is_news_and_unregisters() {
        let h = hub();
        let mut news = h.inner.news.subscribe();
        let old = h.register("d1");
        let new = h.register("d1"); // a reconnect replaced the session
        drop(old);
        assert!(
            lock(&h.inner.links).contains_key("d1"),
            "the newer session stays"
        );
        assert!(matches!(news.recv().await.unwrap(), (d, LinkNews::Gone) if d == "d1"));
        drop(new);
        assert!(!lock(&h.inner.links).contains_key("d1"));
    }
}
