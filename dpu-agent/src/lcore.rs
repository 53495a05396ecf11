//! The software forwarding loop: rx burst → the offload core's pipeline → tx burst, run to
//! completion on one lcore thread that owns every port's queue.
//!
//! No allocation per packet or per burst: the buffers below are sized once. The pipeline is
//! locked once per burst (uncontended unless the control thread is applying a batch).
//! Multi-segment mbufs are dropped and counted (the pipeline rewrites headers in the first
//! segment only; ports are configured without scatter, so they do not occur in practice).
//! Packets the pipeline hands to the host (ARP, ND, non-IP) are counted and dropped: this
//! version has no host path, so neighbours on the agent's ports are static.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use dpdk::{Mbuf, Mempool, Queue, MAX_BURST};
use flow_offload::model::PortId;
use flow_offload::soft::pipeline::{DropReason, Verdict};

use crate::agent::SharedPipeline;
use crate::announce::Announcer;

/// Packets per rx burst.
pub const BURST: u16 = 32;
/// Idle polls before the loop starts sleeping between polls (a real deployment pins the lcore
/// and never sleeps; on shared test machines an idle busy loop would starve everything else).
const IDLE_POLLS: u32 = 1024;
/// NAT expiry runs every this many polls, with this budget.
const EXPIRE_EVERY: u32 = 256;
const EXPIRE_BUDGET: usize = 64;

/// Drop reasons, in counter order.
pub const DROP_REASONS: [DropReason; 14] = [
    DropReason::Malformed,
    DropReason::UnknownPort,
    DropReason::UnknownVni,
    DropReason::NoRoute,
    DropReason::Blackhole,
    DropReason::TtlExceeded,
    DropReason::Policed,
    DropReason::NoSession,
    DropReason::NatExhausted,
    DropReason::Untranslatable,
    DropReason::Unresolved,
    DropReason::VrfLoop,
    DropReason::NoHeadroom,
    DropReason::NatNotActive,
];

fn reason_index(r: DropReason) -> usize {
    DROP_REASONS.iter().position(|x| *x == r).unwrap_or(0)
}

/// Counters of one lcore, readable from any thread.
#[derive(Debug, Default)]
pub struct LcoreStats {
    /// Packets received.
    pub rx: AtomicU64,
    /// Packets sent.
    pub tx: AtomicU64,
    /// Packets the tx queue did not take.
    pub tx_full: AtomicU64,
    /// Packets for the host's stack (dropped: no host path).
    pub to_host: AtomicU64,
    /// Multi-segment packets (dropped).
    pub multi_segment: AtomicU64,
    /// Verdicts naming a port this lcore has no queue for.
    pub no_queue: AtomicU64,
    /// Drops by [`DROP_REASONS`] index.
    pub dropped: [AtomicU64; 14],
}

impl LcoreStats {
    /// One line for logs.
    pub fn summary(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let drops: Vec<String> = DROP_REASONS
            .iter()
            .zip(self.dropped.iter())
            .filter(|(_, c)| get(c) > 0)
            .map(|(r, c)| format!("{r:?}={}", get(c)))
            .collect();
        format!(
            "rx={} tx={} tx_full={} to_host={} multi_segment={} no_queue={} drops[{}]",
            get(&self.rx),
            get(&self.tx),
            get(&self.tx_full),
            get(&self.to_host),
            get(&self.multi_segment),
            get(&self.no_queue),
            drops.join(" ")
        )
    }
}

/// Runs until `stop` is set. `queues` are every port's queue; `clock` is the agent's start.
#[allow(clippy::too_many_arguments)]
pub fn run(
    mut queues: Vec<Queue<'_, '_>>,
    pipeline: SharedPipeline,
    stop: &AtomicBool,
    stats: &LcoreStats,
    clock: Instant,
    pool: &Mempool<'_>,
    announcer: &Announcer,
) {
    let max_port = queues.iter().map(|q| q.port_id()).max().unwrap_or(0);
    // Port id -> queue index.
    let mut queue_of: Vec<Option<usize>> = vec![None; usize::from(max_port) + 1];
    for (i, q) in queues.iter().enumerate() {
        if let Some(slot) = queue_of.get_mut(usize::from(q.port_id())) {
            *slot = Some(i);
        }
    }
    let mut rx: Vec<Mbuf<'_>> = Vec::with_capacity(MAX_BURST);
    let mut out: Vec<Vec<Mbuf<'_>>> = (0..queues.len())
        .map(|_| Vec::with_capacity(MAX_BURST))
        .collect();
    let mut ingress = [PortId(0); MAX_BURST];
    let mut marks = [None; MAX_BURST];
    let mut verdicts = [Verdict::ToHost; MAX_BURST];
    let mut idle: u32 = 0;
    let mut polls: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        if announcer.pending() {
            announce(&mut queues, &queue_of, pool, announcer);
        }
        let mut got = 0usize;
        for qi in 0..queues.len() {
            let Some(q) = queues.get_mut(qi) else { break };
            let port = PortId(q.port_id());
            rx.clear();
            let n = q.rx_burst(&mut rx, BURST);
            if n == 0 {
                continue;
            }
            got += n;
            stats.rx.fetch_add(n as u64, Ordering::Relaxed);
            let before = rx.len();
            rx.retain(|m| m.segments() == 1);
            let multi = before - rx.len();
            if multi > 0 {
                stats
                    .multi_segment
                    .fetch_add(multi as u64, Ordering::Relaxed);
            }
            let n = rx.len();
            for (i, m) in rx.iter().enumerate() {
                if let (Some(p), Some(k)) = (ingress.get_mut(i), marks.get_mut(i)) {
                    *p = port;
                    *k = m.mark();
                }
            }
            let now = u64::try_from(clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
            {
                let mut pipe = pipeline.lock().unwrap_or_else(PoisonError::into_inner);
                if let (Some(i), Some(k), Some(v)) =
                    (ingress.get(..n), marks.get(..n), verdicts.get_mut(..n))
                {
                    pipe.process_burst(&mut rx[..], i, k, v, now);
                }
            }
            for (m, v) in rx.drain(..).zip(verdicts.iter()) {
                match v {
                    Verdict::Tx(p) => {
                        match queue_of
                            .get(usize::from(p.0))
                            .copied()
                            .flatten()
                            .and_then(|o| out.get_mut(o))
                        {
                            Some(buf) => buf.push(m),
                            None => {
                                stats.no_queue.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Verdict::ToHost => {
                        stats.to_host.fetch_add(1, Ordering::Relaxed);
                    }
                    Verdict::Drop(r) => {
                        if let Some(c) = stats.dropped.get(reason_index(*r)) {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            for (oi, buf) in out.iter_mut().enumerate() {
                if buf.is_empty() {
                    continue;
                }
                if let Some(q) = queues.get_mut(oi) {
                    let mut sent = 0;
                    // A full burst may take two calls (MAX_BURST per call).
                    while !buf.is_empty() {
                        let s = q.tx_burst(buf);
                        if s == 0 {
                            break;
                        }
                        sent += s;
                    }
                    stats.tx.fetch_add(sent as u64, Ordering::Relaxed);
                }
                stats.tx_full.fetch_add(buf.len() as u64, Ordering::Relaxed);
                buf.clear();
            }
        }
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(EXPIRE_EVERY) {
            let now = u64::try_from(clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let mut pipe = pipeline.lock().unwrap_or_else(PoisonError::into_inner);
            pipe.expire(now, EXPIRE_BUDGET);
        }
        if got == 0 {
            idle = idle.saturating_add(1);
            if idle > IDLE_POLLS {
                std::thread::sleep(Duration::from_micros(200));
            }
        } else {
            idle = 0;
        }
    }
}

/// Sends the frames the control side queued, one by one (a handful, rarely).
fn announce(
    queues: &mut [Queue<'_, '_>],
    queue_of: &[Option<usize>],
    pool: &Mempool<'_>,
    announcer: &Announcer,
) {
    for (port, frame) in announcer.take() {
        let sent = (|| {
            let q = queues.get_mut(queue_of.get(usize::from(port.0)).copied().flatten()?)?;
            let mut m = pool.alloc()?;
            m.append(u16::try_from(frame.len()).ok()?)?
                .copy_from_slice(&frame);
            let mut one = vec![m];
            (q.tx_burst(&mut one) == 1).then_some(())
        })();
        let c = if sent.is_some() {
            &announcer.sent
        } else {
            &announcer.failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}
