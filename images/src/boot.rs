//! A/B boot control: which slot is active, which one is on trial, and what to do at start-up.
//!
//! The protocol: after a verified flash of the inactive slot, [`mark_pending`] records it with a
//! number of tries and the device reboots into it (the boot loader reads the same state through
//! its own [`BootControl`] backend: U-Boot's bootcount, `mlxbf-bootctl`, or the
//! [`FileBootControl`] used in tests and on hosts without one). On every agent start
//! [`on_start`] decides, from the stored state, the slot actually running and a health check:
//!
//! | pending | running | healthy | tries_left | decision | new state |
//! |---|---|---|---|---|---|
//! | none | any | any | - | Normal | unchanged |
//! | P | P | yes | any | Commit | active = P, no pending |
//! | P | P | no | > 0 | Retry | tries_left - 1 |
//! | P | P | no | 0 | Rollback | active unchanged, no pending |
//! | P | other | any | > 0 | Retry | tries_left - 1 (the trial boot did not happen or died early) |
//! | P | other | any | 0 | Rollback | active unchanged, no pending |
//!
//! The decision is a pure function so every row is tested without a device; persisting it is
//! the caller's job ([`BootControl::store`]).

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fsutil;
use crate::slot::Flashed;

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SlotId {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl SlotId {
    /// The other slot.
    pub fn other(self) -> Self {
        match self {
            SlotId::A => SlotId::B,
            SlotId::B => SlotId::A,
        }
    }
}

impl std::fmt::Display for SlotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SlotId::A => "A",
            SlotId::B => "B",
        })
    }
}

/// A slot on trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The freshly flashed slot.
    pub slot: SlotId,
    /// Further boots into it allowed before rolling back.
    pub tries_left: u8,
}

/// What the boot loader and the agent agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootState {
    /// The last known-good slot.
    pub active: SlotId,
    /// A slot on trial, if any.
    pub pending: Option<Pending>,
}

impl BootState {
    /// A device that runs `active` and has nothing on trial.
    pub fn new(active: SlotId) -> Self {
        Self {
            active,
            pending: None,
        }
    }

    /// The slot the boot loader should start next: the pending one while it has tries left.
    pub fn next_boot(&self) -> SlotId {
        match self.pending {
            Some(p) if p.tries_left > 0 => p.slot,
            _ => self.active,
        }
    }
}

/// What [`on_start`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing on trial.
    Normal,
    /// The slot on trial booted and is healthy: it is now active.
    Commit(SlotId),
    /// The slot on trial is not healthy yet (or did not boot): try it again; `tries_left` after
    /// this attempt is recorded.
    Retry {
        /// The slot on trial.
        slot: SlotId,
        /// Tries remaining.
        tries_left: u8,
    },
    /// Out of tries: back to the previous active slot.
    Rollback {
        /// The slot that failed its trial.
        failed: SlotId,
        /// The slot that stays active.
        to: SlotId,
    },
}

/// Boot control errors.
#[derive(Debug, Error)]
pub enum BootError {
    /// The state could not be read or written.
    #[error("boot state {path}: {source}")]
    Io {
        /// The state file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The stored state is not valid.
    #[error("boot state {path} is corrupt: {source}")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// No state stored yet.
    #[error("no boot state at {0}")]
    NoState(PathBuf),
    /// Asked to put the active slot on trial.
    #[error("slot {0} is the active slot; only the inactive slot can be put on trial")]
    PendingIsActive(SlotId),
    /// Zero tries would roll back before the slot was ever booted.
    #[error("a slot on trial needs at least one try")]
    ZeroTries,
}

/// Where the boot state lives: U-Boot environment, `mlxbf-bootctl`, or a file.
pub trait BootControl: Send + Sync {
    /// Reads the current state.
    fn load(&self) -> Result<BootState, BootError>;
    /// Persists a new state atomically.
    fn store(&self, state: &BootState) -> Result<(), BootError>;
}

/// The start-up decision (see the module table). Pure.
pub fn on_start(state: BootState, running: SlotId, health_ok: bool) -> (Decision, BootState) {
    let Some(p) = state.pending else {
        return (Decision::Normal, state);
    };
    let rollback = (
        Decision::Rollback {
            failed: p.slot,
            to: state.active,
        },
        BootState::new(state.active),
    );
    if running == p.slot && health_ok {
        return (Decision::Commit(p.slot), BootState::new(p.slot));
    }
    if p.tries_left == 0 {
        return rollback;
    }
    let tries_left = p.tries_left - 1;
    (
        Decision::Retry {
            slot: p.slot,
            tries_left,
        },
        BootState {
            active: state.active,
            pending: Some(Pending {
                slot: p.slot,
                tries_left,
            }),
        },
    )
}

/// Puts `slot` on trial with `tries` boots (call after a verified flash of that slot).
pub fn mark_pending(state: BootState, slot: SlotId, tries: u8) -> Result<BootState, BootError> {
    if slot == state.active {
        return Err(BootError::PendingIsActive(slot));
    }
    if tries == 0 {
        return Err(BootError::ZeroTries);
    }
    Ok(BootState {
        active: state.active,
        pending: Some(Pending {
            slot,
            tries_left: tries,
        }),
    })
}

/// After a verified flash: puts the flashed slot on trial with `tries` boots and stores it.
/// Takes [`Flashed`], which only a successful read-back verification produces.
pub fn arm_flashed(
    control: &dyn BootControl,
    flashed: &Flashed,
    tries: u8,
) -> Result<BootState, BootError> {
    let state = mark_pending(control.load()?, flashed.slot, tries)?;
    control.store(&state)?;
    Ok(state)
}

/// At agent start: loads the state, decides with [`on_start`], stores the new state (only if
/// it changed) and returns the decision for the caller to act on (reboot to retry, report a
/// rollback, ...).
pub fn start_up(
    control: &dyn BootControl,
    running: SlotId,
    health_ok: bool,
) -> Result<(Decision, BootState), BootError> {
    let state = control.load()?;
    let (decision, new) = on_start(state, running, health_ok);
    if new != state {
        control.store(&new)?;
    }
    Ok((decision, new))
}

/// Boot state as a JSON file, replaced atomically (tmp, fsync, rename, fsync dir).
#[derive(Debug, Clone)]
pub struct FileBootControl {
    path: PathBuf,
}

impl FileBootControl {
    /// State kept at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the state, or stores and returns `BootState::new(active)` when there is none.
    pub fn load_or_init(&self, active: SlotId) -> Result<BootState, BootError> {
        match self.load() {
            Err(BootError::NoState(_)) => {
                let s = BootState::new(active);
                self.store(&s)?;
                Ok(s)
            }
            other => other,
        }
    }

    fn io(&self) -> impl FnOnce(io::Error) -> BootError + '_ {
        |source| BootError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// First half of [`BootControl::store`]: the new state in the temporary file, synced. A
    /// crash here leaves the old state in place (tested).
    fn write_tmp(&self, state: &BootState) -> Result<PathBuf, BootError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|source| BootError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        fsutil::write_tmp(&self.path, &bytes).map_err(self.io())
    }
}

impl BootControl for FileBootControl {
    fn load(&self) -> Result<BootState, BootError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BootError::NoState(self.path.clone()))
            }
            Err(e) => return Err(self.io()(e)),
        };
        serde_json::from_slice(&bytes).map_err(|source| BootError::Corrupt {
            path: self.path.clone(),
            source,
        })
    }

    fn store(&self, state: &BootState) -> Result<(), BootError> {
        let tmp = self.write_tmp(state)?;
        fsutil::commit_tmp(&tmp, &self.path).map_err(self.io())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use SlotId::{A, B};

    fn st(active: SlotId, pending: Option<(SlotId, u8)>) -> BootState {
        BootState {
            active,
            pending: pending.map(|(slot, tries_left)| Pending { slot, tries_left }),
        }
    }

    #[test]
    fn every_transition() {
        #[rustfmt::skip]
        let table: &[(BootState, SlotId, bool, Decision, BootState)] = &[
            // nothing pending: Normal whatever runs
            (st(A, None), A, true, Decision::Normal, st(A, None)),
            (st(A, None), A, false, Decision::Normal, st(A, None)),
            (st(A, None), B, true, Decision::Normal, st(A, None)),
            // pending slot booted and healthy: commit (also on its last try)
            (st(A, Some((B, 3))), B, true, Decision::Commit(B), st(B, None)),
            (st(A, Some((B, 0))), B, true, Decision::Commit(B), st(B, None)),
            (st(B, Some((A, 1))), A, true, Decision::Commit(A), st(A, None)),
            // pending slot booted, unhealthy, tries left: retry with one fewer
            (st(A, Some((B, 3))), B, false, Decision::Retry { slot: B, tries_left: 2 }, st(A, Some((B, 2)))),
            (st(A, Some((B, 1))), B, false, Decision::Retry { slot: B, tries_left: 0 }, st(A, Some((B, 0)))),
            // pending slot unhealthy with no tries: roll back
            (st(A, Some((B, 0))), B, false, Decision::Rollback { failed: B, to: A }, st(A, None)),
            // the old slot runs while a trial is pending: the trial boot failed early
            (st(A, Some((B, 2))), A, true, Decision::Retry { slot: B, tries_left: 1 }, st(A, Some((B, 1)))),
            (st(A, Some((B, 0))), A, true, Decision::Rollback { failed: B, to: A }, st(A, None)),
            (st(A, Some((B, 0))), A, false, Decision::Rollback { failed: B, to: A }, st(A, None)),
        ];
        for (i, (state, running, healthy, decision, new)) in table.iter().enumerate() {
            let got = on_start(*state, *running, *healthy);
            assert_eq!(got, (*decision, *new), "row {i}");
        }
    }

    #[test]
    fn retries_run_out_into_rollback() {
        let mut s = mark_pending(BootState::new(A), B, 2).unwrap();
        let mut decisions = Vec::new();
        for _ in 0..4 {
            let (d, n) = on_start(s, s.next_boot(), false);
            decisions.push(d);
            s = n;
        }
        assert_eq!(
            decisions,
            vec![
                Decision::Retry {
                    slot: B,
                    tries_left: 1
                },
                Decision::Retry {
                    slot: B,
                    tries_left: 0
                },
                Decision::Rollback { failed: B, to: A },
                Decision::Normal,
            ]
        );
        assert_eq!(s.next_boot(), A);
    }

    #[test]
    fn mark_pending_refuses_active_and_zero() {
        assert!(matches!(
            mark_pending(BootState::new(A), A, 3),
            Err(BootError::PendingIsActive(A))
        ));
        assert!(matches!(
            mark_pending(BootState::new(A), B, 0),
            Err(BootError::ZeroTries)
        ));
        assert_eq!(
            mark_pending(BootState::new(A), B, 3).unwrap(),
            st(A, Some((B, 3)))
        );
    }

    #[test]
    fn file_store_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bc = FileBootControl::new(dir.path().join("boot.json"));
        assert!(matches!(bc.load(), Err(BootError::NoState(_))));
        assert_eq!(bc.load_or_init(A).unwrap(), st(A, None));
        let s = st(A, Some((B, 3)));
        bc.store(&s).unwrap();
        assert_eq!(bc.load().unwrap(), s);
        std::fs::write(bc.path(), b"{\"active\":\"C\"}").unwrap();
        assert!(matches!(bc.load(), Err(BootError::Corrupt { .. })));
    }

    #[test]
    fn start_up_persists_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let bc = FileBootControl::new(dir.path().join("boot.json"));
        bc.store(&st(A, Some((B, 1)))).unwrap();
        // Unhealthy on B: retry, stored.
        let (d, _) = start_up(&bc, B, false).unwrap();
        assert_eq!(
            d,
            Decision::Retry {
                slot: B,
                tries_left: 0
            }
        );
        assert_eq!(bc.load().unwrap(), st(A, Some((B, 0))));
        // Still unhealthy, no tries: rollback, stored.
        let (d, _) = start_up(&bc, B, false).unwrap();
        assert_eq!(d, Decision::Rollback { failed: B, to: A });
        assert_eq!(bc.load().unwrap(), st(A, None));
        let (d, _) = start_up(&bc, A, true).unwrap();
        assert_eq!(d, Decision::Normal);
    }

    #[test]
    fn crash_between_write_and_rename_keeps_old_state() {
        let dir = tempfile::tempdir().unwrap();
        let bc = FileBootControl::new(dir.path().join("boot.json"));
        let old = st(A, None);
        bc.store(&old).unwrap();
        // The crash: the new state reached the temporary file but was never renamed.
        let tmp = bc.write_tmp(&st(A, Some((B, 3)))).unwrap();
        assert!(tmp.exists());
        assert_eq!(bc.load().unwrap(), old);
        // A torn temporary file (crash during the write) does not matter either.
        std::fs::write(&tmp, b"{\"act").unwrap();
        assert_eq!(bc.load().unwrap(), old);
        // The next store replaces it and wins.
        let new = st(A, Some((B, 1)));
        bc.store(&new).unwrap();
        assert_eq!(bc.load().unwrap(), new);
        assert!(!tmp.exists());
    }
}
