//! Image slots on the DPU: flashing the inactive slot on the host's order, and the boot-control
//! decision at every start.
//!
//! A flash runs on its own thread: the order is verified here (trusted keys, target, manifest
//! id) before anything is opened, the inactive slot is locked and written through
//! [`images::flash::flash`] from the host's chunk server, read back, then armed for a trial
//! boot. Progress goes to the link as [`FlashStatus`] messages through a channel.
//!
//! "Boot" here is the agent starting: it runs from the slot the boot loader would pick
//! ([`BootState::next_boot`]). At start, [`Images::open`] counts the boot attempt before
//! anything else can fail (a crash mid-start still uses up a try, as U-Boot's bootcount does)
//! and rolls back when the tries are used up; once the ports are up, [`Images::health_gate`]
//! runs the health check and commits the slot on trial, or asks for a restart. A restart is a
//! re-exec of the agent (see `main.rs`), so the next start reads the state just stored.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flow_offload::wire::{
    BootOutcome, BootReport, FlashFailure, FlashImage, FlashPhase, FlashStatus, SlotName,
};
use images::boot::{arm_flashed, start_up, BootControl, BootError, BootState, Decision, SlotId};
use images::flash::{flash, FlashError, FlashOptions, TcpChunkSource};
use images::format::{verify_manifest, Sha256Digest, SIGNATURE_LEN};
use images::keys::{KeyError, TrustedKeys};
use images::slot::{Slot, SlotError, SlotSet, SlotWriter};
use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;

/// Progress messages are sent at most this often (plus the first and the last).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Most parallel fetch streams an order may ask for.
const MAX_STREAMS: u8 = 16;

/// Setting up the image slots failed; the agent does not start.
#[derive(Debug, thiserror::Error)]
pub enum ImageSetupError {
    /// The trusted keys could not be loaded.
    #[error("image.trusted_keys: {0}")]
    Keys(#[from] KeyError),
    /// A slot could not be opened.
    #[error("image slot: {0}")]
    Slot(#[from] SlotError),
    /// The boot-control state could not be read or written.
    #[error("boot control: {0}")]
    Boot(#[from] BootError),
    /// The state directory could not be created or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the start-up should do after the health gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Serve: nothing on trial, or the trial committed.
    Serve,
    /// The slot on trial is unhealthy: restart (the next start tries again or rolls back).
    Restart {
        /// Why.
        reason: String,
    },
}

/// What the agent persists beside the boot state: which image is on which slot, and how the
/// last trial ended (so a rollback is still reported after the restart it causes).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotRecord {
    images: BTreeMap<String, String>,
    last_failure: Option<String>,
    last: Option<BootOutcome>,
}

/// The DPU's slots, boot state and the flash in progress.
pub struct Images {
    slots: SlotSet,
    control: Arc<dyn BootControl>,
    trusted: TrustedKeys,
    target: String,
    running: SlotId,
    last: BootOutcome,
    health_command: Vec<String>,
    health_timeout: Duration,
    checkpoint_bytes: u64,
    record_path: PathBuf,
    tx: mpsc::Sender<FlashStatus>,
    rx: mpsc::Receiver<FlashStatus>,
    job: Option<std::thread::JoinHandle<()>>,
    last_status: Option<FlashStatus>,
    restart: Arc<AtomicBool>,
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Images")
            .field("running", &self.running)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

/// The wire name of a slot.
pub fn slot_name(s: SlotId) -> SlotName {
    match s {
        SlotId::A => SlotName::A,
        SlotId::B => SlotName::B,
    }
}

fn slot_of(path: &Path, capacity: u64) -> Result<Slot, SlotError> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => Slot::block_device(path),
        _ => Ok(Slot::file(path, capacity)),
    }
}

/// Replaces the slot record (temporary file, then rename).
fn store_record(path: &Path, r: &SlotRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn read_record(path: &Path) -> SlotRecord {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

impl Images {
    /// Opens the slots and the boot state, and counts this start as a boot: a slot on trial
    /// loses a try now; out of tries, the agent is back on the active slot and the trial is
    /// rolled back. The file boot control stands in for the boot loader: the agent runs from
    /// [`BootState::next_boot`] of the stored state.
    pub fn open(cfg: &ImageConfig) -> Result<Images, ImageSetupError> {
        let trusted = TrustedKeys::load_all(&cfg.trusted_keys)?;
        let slots = SlotSet {
            a: slot_of(&cfg.slot_a, cfg.slot_capacity)?,
            b: slot_of(&cfg.slot_b, cfg.slot_capacity)?,
            state_dir: cfg.state_dir.clone(),
        };
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| ImageSetupError::Io {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let control = images::boot::FileBootControl::new(cfg.state_dir.join("boot-state.json"));
        let state = control.load_or_init(SlotId::A)?;
        let running = state.next_boot();
        let record_path = cfg.state_dir.join("slots.json");
        let mut record = read_record(&record_path);
        // Count the attempt before anything can fail (health passing later commits).
        let (decision, _) = start_up(&control, running, false)?;
        let last = match decision {
            Decision::Normal | Decision::Commit(_) => {
                record.last.clone().unwrap_or(BootOutcome::Normal)
            }
            Decision::Retry { slot, tries_left } => {
                tracing::info!(%slot, tries_left, "starting on the slot on trial");
                BootOutcome::Retry {
                    slot: slot_name(slot),
                    tries_left,
                }
            }
            Decision::Rollback { failed, to } => {
                let reason = record
                    .last_failure
                    .take()
                    .unwrap_or_else(|| "the trial boot never became healthy".to_owned());
                tracing::warn!(%failed, %to, %reason, "slot on trial used up its tries: rolled back");
                BootOutcome::RolledBack {
                    failed: slot_name(failed),
                    to: slot_name(to),
                    reason,
                }
            }
        };
        record.last = Some(last.clone());
        let (tx, rx) = mpsc::channel();
        let images = Images {
            slots,
            control: Arc::new(control),
            trusted,
            target: cfg.target.clone(),
            running,
            last,
            health_command: cfg.health_command.clone(),
            health_timeout: Duration::from_secs(cfg.health_timeout_secs),
            checkpoint_bytes: cfg.checkpoint_bytes,
            record_path,
            tx,
            rx,
            job: None,
            last_status: None,
            restart: Arc::new(AtomicBool::new(false)),
        };
        images.write_record(&record)?;
        tracing::info!(running = %running, trusted_keys = images.trusted.len(), "image slots ready");
        Ok(images)
    }

    fn write_record(&self, r: &SlotRecord) -> Result<(), ImageSetupError> {
        store_record(&self.record_path, r).map_err(|source| ImageSetupError::Io {
            path: self.record_path.clone(),
            source,
        })
    }

    /// The slot this start runs from.
    pub fn running(&self) -> SlotId {
        self.running
    }

    /// Runs the health check and, when the running slot is on trial, commits it or asks for a
    /// restart. Call once the agent is up (ports started).
    pub fn health_gate(&mut self) -> Result<Gate, ImageSetupError> {
        let state = self.control.load()?;
        let on_trial = state.pending.is_some_and(|p| p.slot == self.running);
        let health = self.health_check();
        match (&health, on_trial) {
            (Ok(()), true) => {
                let (decision, _) = start_up(self.control.as_ref(), self.running, true)?;
                if let Decision::Commit(slot) = decision {
                    tracing::info!(%slot, "slot on trial is healthy: committed");
                    self.last = BootOutcome::Committed(slot_name(slot));
                    let mut r = read_record(&self.record_path);
                    r.last = Some(self.last.clone());
                    r.last_failure = None;
                    self.write_record(&r)?;
                }
                Ok(Gate::Serve)
            }
            (Ok(()), false) => Ok(Gate::Serve),
            (Err(reason), true) => {
                tracing::warn!(slot = %self.running, %reason, "slot on trial is unhealthy: restarting");
                let mut r = read_record(&self.record_path);
                r.last_failure = Some(reason.clone());
                self.write_record(&r)?;
                Ok(Gate::Restart {
                    reason: reason.clone(),
                })
            }
            (Err(reason), false) => {
                // Nothing to roll back to: run, and say so.
                tracing::warn!(slot = %self.running, %reason, "health check failed on the active slot; serving anyway");
                Ok(Gate::Serve)
            }
        }
    }

    fn health_check(&self) -> Result<(), String> {
        let Some((program, args)) = self.health_command.split_first() else {
            return Ok(());
        };
        let slot_path = self.slots.slot(self.running).path.clone();
        let mut child = Command::new(program)
            .args(args)
            .env("DPUCP_SLOT", self.running.to_string())
            .env("DPUCP_SLOT_PATH", &slot_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("health command {program}: {e}"))?;
        let deadline = Instant::now() + self.health_timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => return Err(format!("health command {program} {st}")),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "health command {program} took more than {:?}",
                        self.health_timeout
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("health command {program}: {e}")),
            }
        }
    }

    /// The boot-control state for the host.
    pub fn report(&self) -> BootReport {
        let state = self
            .control
            .load()
            .unwrap_or_else(|_| BootState::new(self.running));
        let record = read_record(&self.record_path);
        let images = [SlotId::A, SlotId::B]
            .into_iter()
            .filter_map(|s| {
                let hex = record.images.get(&s.to_string())?;
                let bytes = images::hex::decode_array::<32>(hex).ok()?;
                Some((slot_name(s), bytes))
            })
            .collect();
        BootReport {
            running: slot_name(self.running),
            active: slot_name(state.active),
            pending: state.pending.map(|p| (slot_name(p.slot), p.tries_left)),
            last: self.last.clone(),
            images,
        }
    }

    /// Set once a flash with `activate` is armed: the agent should stop and restart.
    pub fn restart_requested(&self) -> bool {
        self.restart.load(Ordering::SeqCst)
    }

    /// Flash statuses produced since the last call (the newest is kept for a host that
    /// connects later: [`Images::last_status`]).
    pub fn drain(&mut self) -> Vec<FlashStatus> {
        let out: Vec<FlashStatus> = self.rx.try_iter().collect();
        if let Some(last) = out.last() {
            self.last_status = Some(last.clone());
        }
        if self.job.as_ref().is_some_and(|j| j.is_finished()) {
            if let Some(j) = self.job.take() {
                let _ = j.join();
            }
        }
        out
    }

    /// The newest flash status, for a host that just connected.
    pub fn last_status(&self) -> Option<&FlashStatus> {
        self.last_status.as_ref()
    }

    /// Starts the flash `order` from the chunk server at `host`. Everything that can be checked
    /// before writing is checked here; a refusal is returned (and nothing is written).
    pub fn start_flash(&mut self, order: &FlashImage, host: IpAddr) -> Result<(), FlashStatus> {
        let failed = |failure, message: String| FlashStatus {
            image_id: order.image_id,
            phase: FlashPhase::Failed { failure, message },
        };
        if self.job.as_ref().is_some_and(|j| !j.is_finished()) {
            return Err(failed(
                FlashFailure::Busy,
                "a flash is already in progress on this DPU".to_owned(),
            ));
        }
        let Ok(sig) = <[u8; SIGNATURE_LEN]>::try_from(order.signature.as_slice()) else {
            return Err(failed(
                FlashFailure::Refused,
                format!(
                    "signature is {} bytes, not {SIGNATURE_LEN}",
                    order.signature.len()
                ),
            ));
        };
        if Sha256Digest::of(&order.manifest).0 != order.image_id {
            return Err(failed(
                FlashFailure::Refused,
                "the manifest does not hash to the image id".to_owned(),
            ));
        }
        let vm = verify_manifest(&order.manifest, &sig, &self.trusted, Some(&self.target))
            .map_err(|e| failed(FlashFailure::Refused, e.to_string()))?;
        if order.tries == 0 {
            return Err(failed(
                FlashFailure::Refused,
                "tries must be at least 1".to_owned(),
            ));
        }
        let boot_err = |e: BootError| failed(FlashFailure::Boot, e.to_string());
        let mut state = self.control.load().map_err(boot_err)?;
        let slot = self.running.other();
        if state.pending.is_some_and(|p| p.slot == slot) {
            // Armed but never booted: a newer flash replaces it.
            tracing::info!(%slot, "a new flash replaces the slot on trial that has not booted");
            state = BootState::new(state.active);
            self.control.store(&state).map_err(boot_err)?;
        }
        let writer = SlotWriter::open(&self.slots, &state, slot, vm.clone())
            .map_err(|e| {
                let failure = match e {
                    SlotError::Busy(_) => FlashFailure::Busy,
                    _ => FlashFailure::Slot,
                };
                failed(failure, e.to_string())
            })?
            .with_checkpoint_bytes(self.checkpoint_bytes);
        let resumed = writer.done_count();
        let total = vm.manifest().chunk_count();
        tracing::info!(image = %vm.id(), %slot, total, resumed, server_port = order.server_port, "flash started");
        let _ = self.tx.send(FlashStatus {
            image_id: order.image_id,
            phase: FlashPhase::Started {
                slot: slot_name(slot),
                total,
                resumed,
            },
        });
        // Forget the old record of this slot: it is being overwritten.
        let mut r = read_record(&self.record_path);
        r.images.remove(&slot.to_string());
        let _ = self.write_record(&r);

        let tx = self.tx.clone();
        let control = self.control.clone();
        let restart = self.restart.clone();
        let record_path = self.record_path.clone();
        let source = TcpChunkSource::new(SocketAddr::new(host, order.server_port), &vm);
        let opts = FlashOptions {
            parallel: usize::from(order.streams.clamp(1, MAX_STREAMS)),
            ..FlashOptions::default()
        };
        let (image_id, tries, activate) = (order.image_id, order.tries, order.activate);
        let job = std::thread::Builder::new()
            .name("flash".into())
            .spawn(move || {
                // The first chunk is reported at once (the flash is under way), then at most
                // every PROGRESS_EVERY, and the last one.
                let last_sent: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
                let progress = |p: images::flash::FlashProgress| {
                    let mut last = last_sent.lock().unwrap_or_else(|e| e.into_inner());
                    let due = last.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
                    if p.done == p.total || due {
                        *last = Some(Instant::now());
                        let _ = tx.send(FlashStatus {
                            image_id,
                            phase: FlashPhase::Progress {
                                done: p.done,
                                total: p.total,
                            },
                        });
                    }
                };
                let phase = match flash(&source, writer, &opts, &progress) {
                    Ok(report) => match arm_flashed(control.as_ref(), &report.flashed, tries) {
                        Ok(_) => {
                            let mut r = read_record(&record_path);
                            r.images.insert(slot.to_string(), vm.id().to_hex());
                            if let Err(e) = store_record(&record_path, &r) {
                                tracing::warn!(error = %e, "cannot record the slot's image");
                            }
                            tracing::info!(%slot, tries, fetches = report.fetches, refetches = report.refetches, resumed = report.resumed, "flash verified and armed");
                            FlashPhase::Flashed {
                                slot: slot_name(slot),
                                tries,
                                fetches: report.fetches,
                                refetches: report.refetches,
                                resumed: report.resumed,
                            }
                        }
                        Err(e) => FlashPhase::Failed {
                            failure: FlashFailure::Boot,
                            message: e.to_string(),
                        },
                    },
                    Err(e) => {
                        let failure = match &e {
                            FlashError::Fetch { .. } => FlashFailure::Fetch,
                            FlashError::Corrupt { .. } => FlashFailure::Corrupt,
                            FlashError::Slot(_) => FlashFailure::Slot,
                        };
                        tracing::warn!(error = %e, "flash failed; flashing the same image again resumes");
                        FlashPhase::Failed {
                            failure,
                            message: e.to_string(),
                        }
                    }
                };
                let armed = matches!(phase, FlashPhase::Flashed { .. });
                let _ = tx.send(FlashStatus { image_id, phase });
                if armed && activate {
                    tracing::info!(%slot, "restarting into the new slot");
                    let _ = tx.send(FlashStatus {
                        image_id,
                        phase: FlashPhase::Rebooting {
                            slot: slot_name(slot),
                        },
                    });
                    restart.store(true, Ordering::SeqCst);
                }
            })
            .map_err(|e| failed(FlashFailure::Slot, format!("flash thread: {e}")))?;
        self.job = Some(job);
        Ok(())
    }
}
