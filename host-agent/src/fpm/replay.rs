//! When zebra's replay is over, and whether it may remove anything.
//!
//! zebra replays its whole RIB on every (re)connect and then streams changes. Nothing in the
//! stream marks the end of the replay, so it is judged over after [`REPLAY_QUIET`] without a
//! message. Routes the previous connections installed and the new one did not replay are then
//! *stale* and removed ([`Rib::end_resync`]).
//!
//! # The rule
//! A connection sweeps stale routes only after it has **delivered its replay**:
//! 1. it delivered at least one valid `RTM_NEWROUTE` or `RTM_NEWNEXTHOP` (a message that
//!    decodes into [`FpmEvent::Route`] or [`FpmEvent::Nexthop`]: what a replay is made of);
//! 2. and it then went quiet for [`REPLAY_QUIET`] while still connected, with nothing left
//!    queued for the consumer.
//!
//! Until then nothing is removed. The quiet timer starts at the first such message, not at
//! the connect: zebra may take its time before it starts replaying. A connection that
//! delivers nothing (a port probe, or a process that connects and closes), one that sends
//! garbage (the server resets it on a framing error), and one that dies mid-replay remove
//! nothing. The routes they did not replay stay installed and stay marked stale (an older
//! [`Rib`] generation): the next connection that completes a replay sweeps them.
//!
//! The consequence: a zebra whose replay is genuinely empty (no route, no nexthop at all)
//! cannot be told from an idle connection, so the previous routes stay until zebra sends its
//! first route. zebra always has connected routes and nexthop objects to send, so this does
//! not happen with a configured router.
//!
//! The server ([`super::server`]) keeps one zebra connection at a time, so there is exactly
//! one connection whose replay is tracked: a second connection is refused, and cannot start a
//! replay of its own.

use std::time::Duration;

use tokio::time::Instant;

use super::decode::FpmEvent;
use super::rib::{Attribution, ChangeBatch, Rib};

/// How long zebra must be quiet, after it started replaying, for the replay to count as over.
pub const REPLAY_QUIET: Duration = Duration::from_secs(1);

/// Where the current connection's replay stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayState {
    /// No connection.
    Disconnected,
    /// Connected; nothing a replay is made of has arrived yet. Nothing will be removed.
    Waiting {
        /// The server's connection number.
        connection: u64,
    },
    /// The replay is under way: it is over at `quiet_at` unless more arrives.
    Replaying {
        /// The server's connection number.
        connection: u64,
        /// When it counts as over.
        quiet_at: Instant,
    },
    /// The replay is over: the stale routes were removed; zebra now streams changes.
    Live {
        /// The server's connection number.
        connection: u64,
    },
}

/// What a disconnect left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayEnd {
    /// The connection had completed its replay (or there was none being tracked).
    Complete,
    /// It never delivered a replay message: nothing was removed.
    NothingDelivered,
    /// It died mid-replay: nothing was removed; routes not replayed stay marked stale.
    Incomplete,
}

/// Tracks the replay of the current zebra connection and applies [the rule](self).
#[derive(Debug, Clone)]
pub struct ReplayTracker {
    quiet: Duration,
    state: ReplayState,
}

impl Default for ReplayTracker {
    fn default() -> ReplayTracker {
        ReplayTracker::new(REPLAY_QUIET)
    }
}

/// Whether an event is part of what zebra replays on connect.
fn is_replay_message(ev: &FpmEvent) -> bool {
    matches!(ev, FpmEvent::Route(_) | FpmEvent::Nexthop(_))
}

impl ReplayTracker {
    /// A tracker that ends replays after `quiet` without a message.
    pub fn new(quiet: Duration) -> ReplayTracker {
        ReplayTracker {
            quiet,
            state: ReplayState::Disconnected,
        }
    }

    /// Where the replay stands.
    pub fn state(&self) -> ReplayState {
        self.state
    }

    /// A connection was accepted: zebra will replay. Marks every route in `rib` as possibly
    /// stale ([`Rib::begin_resync`]); nothing is removed until the replay is delivered.
    pub fn connected(&mut self, connection: u64, rib: &mut Rib) {
        rib.begin_resync();
        self.state = ReplayState::Waiting { connection };
    }

    /// Events from the current connection arrived at `now`.
    pub fn events(&mut self, events: &[FpmEvent], now: Instant) {
        match self.state {
            ReplayState::Waiting { connection } => {
                if events.iter().any(is_replay_message) {
                    self.state = ReplayState::Replaying {
                        connection,
                        quiet_at: now + self.quiet,
                    };
                }
            }
            ReplayState::Replaying { connection, .. } => {
                // Any message means zebra is not quiet yet.
                if !events.is_empty() {
                    self.state = ReplayState::Replaying {
                        connection,
                        quiet_at: now + self.quiet,
                    };
                }
            }
            ReplayState::Live { .. } | ReplayState::Disconnected => {}
        }
    }

    /// When the consumer must call [`ReplayTracker::quiet`] (`None`: no replay under way).
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            ReplayState::Replaying { quiet_at, .. } => Some(quiet_at),
            _ => None,
        }
    }

    /// The quiet deadline may have passed. If the replay is over (delivered, quiet since
    /// `quiet_at`, and `more_queued` is false: no event from zebra is waiting to be
    /// consumed), removes the stale routes into `out` and returns true: every route should
    /// then be acknowledged again (zebra keeps its old flags across reconnects). Otherwise
    /// removes nothing and returns false.
    pub fn quiet(
        &mut self,
        now: Instant,
        more_queued: bool,
        rib: &mut Rib,
        attr: &dyn Attribution,
        out: &mut ChangeBatch,
    ) -> bool {
        match self.state {
            ReplayState::Replaying {
                connection,
                quiet_at,
            } if now >= quiet_at && !more_queued => {
                rib.end_resync(attr, out);
                self.state = ReplayState::Live { connection };
                true
            }
            _ => false,
        }
    }

    /// The connection ended. An unfinished replay is abandoned: nothing is removed.
    pub fn disconnected(&mut self, connection: u64) -> ReplayEnd {
        let end = match self.state {
            ReplayState::Waiting { connection: c } if c == connection => {
                ReplayEnd::NothingDelivered
            }
            ReplayState::Replaying { connection: c, .. } if c == connection => {
                ReplayEnd::Incomplete
            }
            _ => ReplayEnd::Complete,
        };
        self.state = ReplayState::Disconnected;
        end
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::fpm::decode::{RouteKind, RouteNexthops, RouteUpdate};
    use crate::fpm::rib::StaticAttribution;
    use flow_offload::model::{Change, TableId};

    fn attr() -> StaticAttribution {
        let mut a = StaticAttribution::default();
        a.tables.insert(254, TableId(254));
        a
    }

    fn blackhole(prefix: &str) -> FpmEvent {
        FpmEvent::Route(RouteUpdate {
            table: 254,
            prefix: prefix.parse().unwrap(),
            protocol: 196,
            kind: RouteKind::Blackhole,
            replace: true,
            metric: None,
            nexthops: RouteNexthops::Paths(Vec::new()),
        })
    }

    /// A RIB with 10.1/24 and 10.2/24 from a first connection whose replay completed.
    fn established(t: &mut ReplayTracker, rib: &mut Rib, now: Instant) {
        let a = attr();
        let mut b = ChangeBatch::new();
        t.connected(1, rib);
        let evs = [blackhole("10.1.0.0/24"), blackhole("10.2.0.0/24")];
        rib.apply_all(&evs, &a, &mut b);
        t.events(&evs, now);
        assert!(t.quiet(now + REPLAY_QUIET, false, rib, &a, &mut b));
        assert_eq!(b.take().len(), 2, "two upserts, no delete");
        assert_eq!(t.disconnected(1), ReplayEnd::Complete);
    }

    #[test]
    fn a_connection_that_delivers_nothing_removes_nothing() {
        let (mut t, mut rib, a) = (ReplayTracker::default(), Rib::new(), attr());
        let now = Instant::now();
        established(&mut t, &mut rib, now);
        t.connected(2, &mut rib);
        // Non-replay events (a delete of something unknown) do not start the timer.
        t.events(&[], now);
        assert_eq!(t.deadline(), None);
        let mut b = ChangeBatch::new();
        assert!(!t.quiet(now + REPLAY_QUIET * 10, false, &mut rib, &a, &mut b));
        assert_eq!(t.disconnected(2), ReplayEnd::NothingDelivered);
        assert!(b.is_empty());
        assert_eq!(rib.stats().routes, 2);
    }

    #[test]
    fn the_timer_starts_at_the_first_message_and_each_message_extends_it() {
        let (mut t, mut rib, a) = (ReplayTracker::default(), Rib::new(), attr());
        let t0 = Instant::now();
        established(&mut t, &mut rib, t0);
        t.connected(2, &mut rib);
        // zebra waits 5 quiet periods before it starts: no deadline meanwhile.
        let start = t0 + REPLAY_QUIET * 5;
        let mut b = ChangeBatch::new();
        assert!(!t.quiet(start, false, &mut rib, &a, &mut b));
        let first = [blackhole("10.1.0.0/24")];
        rib.apply_all(&first, &a, &mut b);
        t.events(&first, start);
        assert_eq!(t.deadline(), Some(start + REPLAY_QUIET));
        let later = start + REPLAY_QUIET / 2;
        let second = [blackhole("10.2.0.0/24")];
        rib.apply_all(&second, &a, &mut b);
        t.events(&second, later);
        assert!(!t.quiet(start + REPLAY_QUIET, false, &mut rib, &a, &mut b));
        // Events still queued for the consumer hold the sweep back.
        assert!(!t.quiet(later + REPLAY_QUIET, true, &mut rib, &a, &mut b));
        assert!(t.quiet(later + REPLAY_QUIET, false, &mut rib, &a, &mut b));
        assert!(b.is_empty(), "everything was replayed: {:?}", b.changes());
        assert_eq!(t.state(), ReplayState::Live { connection: 2 });
    }

    #[test]
    fn a_dead_replay_leaves_stale_routes_for_the_next_complete_one() {
        let (mut t, mut rib, a) = (ReplayTracker::default(), Rib::new(), attr());
        let now = Instant::now();
        established(&mut t, &mut rib, now);
        let mut b = ChangeBatch::new();
        // Connection 2 replays 10.1 only, then dies before going quiet.
        t.connected(2, &mut rib);
        let one = [blackhole("10.1.0.0/24")];
        rib.apply_all(&one, &a, &mut b);
        t.events(&one, now);
        assert_eq!(t.disconnected(2), ReplayEnd::Incomplete);
        assert!(!t.quiet(now + REPLAY_QUIET * 3, false, &mut rib, &a, &mut b));
        assert!(b.is_empty());
        assert_eq!(rib.stats().routes, 2);
        // Connection 3 replays 10.1 and 10.3 and completes: 10.2 goes.
        t.connected(3, &mut rib);
        let evs = [blackhole("10.1.0.0/24"), blackhole("10.3.0.0/24")];
        rib.apply_all(&evs, &a, &mut b);
        t.events(&evs, now);
        assert!(t.quiet(now + REPLAY_QUIET, false, &mut rib, &a, &mut b));
        let deleted: Vec<_> = b
            .take()
            .into_iter()
            .filter_map(|c| match c {
                Change::DeleteRoute(k) => Some(k.prefix.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, vec!["10.2.0.0/24".to_owned()]);
    }
}
