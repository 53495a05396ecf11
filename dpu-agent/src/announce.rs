//! Announcements: frames the control side asks the forwarding lcore to send once (the lcore
//! owns the ports' queues). A pair member that becomes active announces the shared router MAC
//! on every port, so that the bridges and switches in front of the pair move that MAC to it
//! (the VPC hosts and the wire keep their ARP and ND entries: the MAC does not change, only
//! where it is).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use flow_offload::model::{Model, PortId};
use flow_offload::packet::arp::{announcement, ANNOUNCEMENT_LEN};

/// Frames waiting for the lcore, at most [`Announcer::CAPACITY`].
#[derive(Debug, Default)]
pub struct Announcer {
    pending: AtomicBool,
    frames: Mutex<Vec<(PortId, [u8; ANNOUNCEMENT_LEN])>>,
    /// Frames sent.
    pub sent: AtomicU64,
    /// Frames the lcore could not send (no mbuf, no queue, TX full).
    pub failed: AtomicU64,
    /// Frames refused because the queue was full.
    pub overflow: AtomicU64,
}

impl Announcer {
    /// Frames held at most (a request beyond it is counted in `overflow`).
    pub const CAPACITY: usize = 64;

    /// Queues `frames` for the lcore.
    pub fn request(&self, frames: impl IntoIterator<Item = (PortId, [u8; ANNOUNCEMENT_LEN])>) {
        let mut q = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        for f in frames {
            if q.len() < Self::CAPACITY {
                q.push(f);
            } else {
                self.overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.pending.store(!q.is_empty(), Ordering::Release);
    }

    /// Whether frames are waiting (one atomic load: the lcore asks on every poll).
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Takes the waiting frames.
    pub fn take(&self) -> Vec<(PortId, [u8; ANNOUNCEMENT_LEN])> {
        let mut q = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        self.pending.store(false, Ordering::Release);
        std::mem::take(&mut *q)
    }
}

/// The announcements of the router MAC of `model`'s node on `ports`: on an uplink a
/// gratuitous ARP for the VTEP (the underlay may learn the address too), on every other port
/// one with no address (a tenant learns nothing of the underlay). Empty without a node.
pub fn router_mac_announcements(
    model: &Model,
    ports: impl IntoIterator<Item = PortId>,
) -> Vec<(PortId, [u8; ANNOUNCEMENT_LEN])> {
    let Some(node) = model.node() else {
        return Vec::new();
    };
    ports
        .into_iter()
        .map(|p| {
            let ip = if node.uplinks.contains(&p) {
                node.vtep
            } else {
                core::net::Ipv4Addr::UNSPECIFIED
            };
            (p, announcement(node.router_mac.0, ip))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use flow_offload::model::{Change, MacAddr, Node};

    #[test]
    fn uplinks_announce_the_vtep_other_ports_no_address_and_the_queue_is_bounded() {
        let mut m = Model::new();
        assert!(router_mac_announcements(&m, [PortId(0)]).is_empty());
        m.apply(&[Change::SetNode(Node {
            vtep: "192.0.2.1".parse().unwrap(),
            router_mac: MacAddr([2, 0xdc, 0, 0, 1, 1]),
            uplinks: [PortId(0)].into_iter().collect(),
        })])
        .unwrap();
        let f = router_mac_announcements(&m, [PortId(0), PortId(1)]);
        assert_eq!(f.len(), 2);
        assert_eq!(&f[0].1[28..32], &[192, 0, 2, 1]);
        assert_eq!(&f[1].1[28..32], &[0, 0, 0, 0]);
        assert_eq!(&f[1].1[6..12], &[2, 0xdc, 0, 0, 1, 1]);

        let a = Announcer::default();
        assert!(!a.pending());
        a.request(std::iter::repeat_n(f[0], Announcer::CAPACITY + 3));
        assert!(a.pending());
        assert_eq!(a.overflow.load(Ordering::Relaxed), 3);
        assert_eq!(a.take().len(), Announcer::CAPACITY);
        assert!(!a.pending());
    }
}
