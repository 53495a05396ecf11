//! Unit tests of the NAT table: behaviour, expiry, limits, and a reference model.

use super::*;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::net::Ipv6Addr;

impl<I> NatTable<I>
where
    I: Copy + Eq + Hash + Debug,
{
    /// Checks every internal invariant; used after each step of the property tests.
    fn check_invariants(&self) -> Result<(), String> {
        let cap_s = self.cfg.max_sessions;
        let cap_m = self.cfg.max_mappings;
        if self.live.len() + self.free_sessions.len() != cap_s {
            return Err("session free list and live list do not add up".into());
        }
        if self.out_index.len != self.live.len() || self.in_index.len != self.live.len() {
            return Err("session index sizes differ from the live count".into());
        }
        let occupied = self.sessions.iter().filter(|s| s.s.is_some()).count();
        if occupied != self.live.len() {
            return Err("occupied session slots differ from the live list".into());
        }
        let mut per_mapping: HashMap<u32, u32> = HashMap::new();
        for (pos, &idx) in self.live.iter().enumerate() {
            let s = self.sessions[idx as usize].s.ok_or("live entry is empty")?;
            if s.live_pos as usize != pos {
                return Err(format!("session {idx} has a stale live_pos"));
            }
            let key = FlowKey {
                proto: s.proto,
                inside: s.inside,
                remote: s.remote,
            };
            let f = self.out_index.find(self.hash_out(&key), |i| i == idx);
            let g = self
                .in_index
                .find(self.hash_in(s.proto, s.outside, s.remote), |i| i == idx);
            if f != Some(idx) || g != Some(idx) {
                return Err(format!("session {idx} not reachable through the indexes"));
            }
            let m = self.mappings[s.mapping as usize].ok_or("session without mapping")?;
            if m.proto != s.proto || m.inside != s.inside || m.outside != s.outside {
                return Err(format!("session {idx} disagrees with its mapping"));
            }
            if s.proto == Proto::Icmp && s.remote.1 != 0 {
                return Err("ICMP session with a remote port".into());
            }
            *per_mapping.entry(s.mapping).or_default() += 1;
        }
        let mut outside_seen = HashSet::new();
        let mut per_set: HashMap<usize, u32> = HashMap::new();
        let mut n_maps = 0;
        for (midx, m) in self.mappings.iter().enumerate() {
            let Some(m) = m else { continue };
            n_maps += 1;
            let midx = midx as u32;
            if per_mapping.get(&midx).copied().unwrap_or(0) != m.sessions || m.sessions == 0 {
                return Err(format!("mapping {midx} has a wrong session count"));
            }
            if !outside_seen.insert((m.proto, m.outside)) {
                return Err(format!("two mappings share {:?} {:?}", m.proto, m.outside));
            }
            if self.cfg.pool[m.addr_idx as usize] != m.outside.0
                || m.addr_idx != self.paired_addr(m.inside.0)
            {
                return Err(format!("mapping {midx} not on its paired address"));
            }
            let (lo, hi) = self.cfg.port_range;
            if m.outside.1 < lo || m.outside.1 > hi {
                return Err(format!("mapping {midx} port out of range"));
            }
            let set = PortBitmaps::set_of(m.addr_idx, m.proto);
            if self.ports.is_free(set, u32::from(m.outside.1 - lo)) {
                return Err(format!("mapping {midx} port not marked used"));
            }
            *per_set.entry(set).or_default() += 1;
            if self
                .map_index
                .find(self.hash_map(m.proto, m.inside), |i| i == midx)
                != Some(midx)
            {
                return Err(format!("mapping {midx} not reachable through its index"));
            }
        }
        if n_maps != self.mapping_count() || n_maps + self.free_mappings.len() != cap_m {
            return Err("mapping counts do not add up".into());
        }
        if self.map_index.len != n_maps {
            return Err("mapping index size differs".into());
        }
        if self.bind_index.len != n_maps {
            return Err("binding index size differs".into());
        }
        for (midx, m) in self.mappings.iter().enumerate() {
            let Some(m) = m else { continue };
            let midx = midx as u32;
            if self.find_binding(m.proto, m.outside) != Some(midx) {
                return Err(format!(
                    "mapping {midx} not reachable by its outside endpoint"
                ));
            }
            // Its session list: exactly its sessions, linked both ways.
            let (mut prev, mut cur, mut n) = (NIL, m.first, 0u32);
            while cur != NIL {
                let s = self.sessions[cur as usize]
                    .s
                    .ok_or("session list through an empty slot")?;
                if s.mapping != midx || s.map_prev != prev {
                    return Err(format!("mapping {midx} session list broken at {cur}"));
                }
                n += 1;
                if n > m.sessions {
                    return Err(format!("mapping {midx} session list too long"));
                }
                prev = cur;
                cur = s.map_next;
            }
            if n != m.sessions {
                return Err(format!(
                    "mapping {midx} session list has {n} of {}",
                    m.sessions
                ));
            }
        }
        for set in 0..self.cfg.pool.len() * 3 {
            let used = per_set.get(&set).copied().unwrap_or(0);
            let words = &self.ports.bits[set * self.ports.words..(set + 1) * self.ports.words];
            let ones: u32 = words.iter().map(|w| w.count_ones()).sum();
            if ones != used || self.ports.free[set] != self.ports.n - used {
                return Err(format!("port bitmap {set} out of sync"));
            }
            let (blo, bn) = (self.ports.blo, self.ports.bn);
            let block_used = (blo..blo + bn)
                .filter(|&off| !self.ports.is_free(set, off))
                .count() as u32;
            if self.ports.block_free[set] != bn - block_used {
                return Err(format!("port bitmap {set}: block free count out of sync"));
            }
        }
        Ok(())
    }
}

const S: u64 = SEC;
const POOL_A: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const POOL_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const H1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const H2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const R1: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const R2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const R3: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);

fn cfg(pool: Vec<Ipv4Addr>, range: (u16, u16), sessions: usize, mappings: usize) -> NatConfig {
    NatConfig {
        max_mappings: mappings,
        max_sessions: sessions,
        pool,
        port_range: range,
        timeouts: Timeouts::default(),
        block: AllocBlock::WHOLE,
    }
}

fn table(c: NatConfig) -> (NatTable<Ipv4Addr>, XorShift32) {
    let mut rng = XorShift32(0x1234_5678);
    let t = NatTable::new(c, &mut rng).unwrap();
    (t, rng)
}

fn small() -> (NatTable<Ipv4Addr>, XorShift32) {
    table(cfg(vec![POOL_A, POOL_B], (1024, 65535), 64, 64))
}

#[test]
fn default_timeouts() {
    let t = Timeouts::default();
    assert_eq!(t.tcp_established_ns, 7440 * S);
    assert_eq!(t.tcp_transitory_ns, 240 * S);
    assert_eq!(t.udp_ns, 300 * S);
    assert_eq!(t.icmp_ns, 60 * S);
}

#[test]
fn xorshift_is_deterministic_and_survives_zero() {
    let mut a = XorShift32(7);
    let mut b = XorShift32(7);
    let xs: Vec<u32> = (0..5).map(|_| a.next_u32()).collect();
    let ys: Vec<u32> = (0..5).map(|_| b.next_u32()).collect();
    assert_eq!(xs, ys);
    let mut z = XorShift32(0);
    assert_ne!(z.next_u32(), 0);
    assert_ne!(z.0, 0);
}

#[test]
fn config_validation() {
    let mut rng = XorShift32(1);
    let ok = cfg(vec![POOL_A], (1024, 2047), 8, 8);
    assert!(NatTable::<Ipv4Addr>::new(ok.clone(), &mut rng).is_ok());
    let cases: Vec<(NatConfig, NatConfigError)> = vec![
        (
            NatConfig {
                pool: vec![],
                ..ok.clone()
            },
            NatConfigError::EmptyPool,
        ),
        (
            NatConfig {
                pool: vec![POOL_A, POOL_B, POOL_A],
                ..ok.clone()
            },
            NatConfigError::DuplicatePoolAddress(POOL_A),
        ),
        (
            NatConfig {
                pool: (0..=MAX_POOL as u32).map(Ipv4Addr::from).collect(),
                ..ok.clone()
            },
            NatConfigError::PoolTooLarge {
                len: MAX_POOL + 1,
                max: MAX_POOL,
            },
        ),
        (
            NatConfig {
                port_range: (2000, 1999),
                ..ok.clone()
            },
            NatConfigError::BadPortRange { lo: 2000, hi: 1999 },
        ),
        (
            NatConfig {
                port_range: (0, 10),
                ..ok.clone()
            },
            NatConfigError::BadPortRange { lo: 0, hi: 10 },
        ),
        (
            NatConfig {
                max_mappings: 0,
                ..ok.clone()
            },
            NatConfigError::ZeroMappings,
        ),
        (
            NatConfig {
                max_sessions: 0,
                ..ok.clone()
            },
            NatConfigError::ZeroSessions,
        ),
        (
            NatConfig {
                max_sessions: MAX_CAPACITY + 1,
                ..ok.clone()
            },
            NatConfigError::TooManySessions {
                requested: MAX_CAPACITY + 1,
                max: MAX_CAPACITY,
            },
        ),
        (
            NatConfig {
                max_mappings: MAX_CAPACITY + 1,
                ..ok.clone()
            },
            NatConfigError::TooManyMappings {
                requested: MAX_CAPACITY + 1,
                max: MAX_CAPACITY,
            },
        ),
        (
            NatConfig {
                timeouts: Timeouts {
                    udp_ns: 0,
                    ..Timeouts::default()
                },
                ..ok.clone()
            },
            NatConfigError::ZeroTimeout("udp_ns"),
        ),
    ];
    for (c, e) in cases {
        assert_eq!(
            NatTable::<Ipv4Addr>::new(c, &mut rng).err(),
            Some(NatError::Config(e))
        );
    }
    // Single port, single session: the smallest table.
    assert!(NatTable::<Ipv4Addr>::new(cfg(vec![POOL_A], (1, 1), 1, 1), &mut rng).is_ok());
    assert!(NatTable::<Ipv4Addr>::new(cfg(vec![POOL_A], (65535, 65535), 1, 1), &mut rng).is_ok());
}

#[test]
fn outbound_then_inbound_round_trip() {
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 0, &mut rng)
        .unwrap();
    assert!(o.outside.0 == POOL_A || o.outside.0 == POOL_B);
    assert!(o.outside.1 >= 1024);
    assert_eq!((o.inside, o.remote), ((H1, 5000), (R1, 53)));
    let i = t.inbound(Proto::Udp, (R1, 53), o.outside, 0, S).unwrap();
    assert_eq!(i, o);
    // The same flow again is the same session.
    let o2 = t
        .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 2 * S, &mut rng)
        .unwrap();
    assert_eq!(o2, o);
    assert_eq!(t.session_count(), 1);
    assert_eq!(t.mapping_count(), 1);
    assert_eq!(t.mapping(Proto::Udp, (H1, 5000)), Some(o.outside));
    // Another protocol is another mapping.
    assert_eq!(t.inbound(Proto::Tcp, (R1, 53), o.outside, 0, S), None);
    let s = t.stats();
    assert_eq!(
        (s.created, s.mappings_created, s.inbound_dropped),
        (1, 1, 1)
    );
    t.check_invariants().unwrap();
}

#[test]
fn endpoint_independent_mapping() {
    let (mut t, mut rng) = small();
    let a = t
        .outbound(Proto::Udp, (H1, 5000), (R1, 1000), 0, 0, &mut rng)
        .unwrap();
    let b = t
        .outbound(Proto::Udp, (H1, 5000), (R2, 2000), 0, 0, &mut rng)
        .unwrap();
    assert_eq!(a.outside, b.outside);
    assert_ne!(a.session, b.session);
    assert_eq!(t.mapping_count(), 1);
    assert_eq!(t.session_count(), 2);
    // A different inside port is a different mapping.
    let c = t
        .outbound(Proto::Udp, (H1, 5001), (R1, 1000), 0, 0, &mut rng)
        .unwrap();
    assert_ne!(c.outside, a.outside);
    t.check_invariants().unwrap();
}

#[test]
fn address_and_port_dependent_filtering() {
    let (mut t, mut rng) = small();
    let a = t
        .outbound(Proto::Udp, (H1, 5000), (R1, 1000), 0, 0, &mut rng)
        .unwrap();
    t.outbound(Proto::Udp, (H1, 5000), (R2, 2000), 0, 0, &mut rng)
        .unwrap();
    assert!(t.inbound(Proto::Udp, (R1, 1000), a.outside, 0, 1).is_some());
    assert!(t.inbound(Proto::Udp, (R2, 2000), a.outside, 0, 1).is_some());
    // A third remote is refused, and so is a known remote from another port.
    assert_eq!(t.inbound(Proto::Udp, (R3, 1000), a.outside, 0, 1), None);
    assert_eq!(t.inbound(Proto::Udp, (R1, 1001), a.outside, 0, 1), None);
    // Refused packets create nothing.
    assert_eq!(t.session_count(), 2);
    assert_eq!(t.stats().inbound_dropped, 2);
}

#[test]
fn paired_pooling() {
    let (mut t, mut rng) = table(cfg(
        (1..=8).map(|i| Ipv4Addr::new(198, 51, 100, i)).collect(),
        (1024, 65535),
        256,
        256,
    ));
    for h in 1..=20u8 {
        let host = Ipv4Addr::new(10, 0, 0, h);
        let mut addrs = HashSet::new();
        for (i, p) in Proto::ALL.into_iter().enumerate() {
            for port in 0..3u16 {
                let o = t
                    .outbound(p, (host, 4000 + port), (R1, 80 + i as u16), 0, 0, &mut rng)
                    .unwrap();
                addrs.insert(o.outside.0);
            }
        }
        assert_eq!(addrs.len(), 1, "host {host} spread over {addrs:?}");
    }
    t.check_invariants().unwrap();
}

#[test]
fn icmp_identifier_is_the_port() {
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Icmp, (H1, 77), (R1, 12345), 0, 0, &mut rng)
        .unwrap();
    assert_eq!(o.remote, (R1, 0));
    assert!(o.outside.1 >= 1024);
    // The echo reply carries our identifier; whatever "remote port" the caller passes.
    let i = t.inbound(Proto::Icmp, (R1, 999), o.outside, 0, S).unwrap();
    assert_eq!(i.inside, (H1, 77));
    assert_eq!(t.inbound(Proto::Icmp, (R2, 0), o.outside, 0, S), None);
    // Another echo to the same remote with a different remote port is the same session.
    let o2 = t
        .outbound(Proto::Icmp, (H1, 77), (R1, 1), 0, S, &mut rng)
        .unwrap();
    assert_eq!(o2.session, o.session);
}

#[test]
fn nat64_inside_addresses() {
    let mut rng = XorShift32(99);
    let mut t: NatTable<Ipv6Addr> =
        NatTable::new(cfg(vec![POOL_A], (1024, 2047), 16, 16), &mut rng).unwrap();
    let h6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    let o = t
        .outbound(Proto::Tcp, (h6, 40000), (R1, 443), TCP_SYN, 0, &mut rng)
        .unwrap();
    assert_eq!(o.outside.0, POOL_A);
    let i = t
        .inbound(Proto::Tcp, (R1, 443), o.outside, TCP_SYN | TCP_ACK, 1)
        .unwrap();
    assert_eq!(i.inside, (h6, 40000));
    assert_eq!(
        t.session(o.session).unwrap().tcp_state,
        Some(TcpState::Established)
    );
    t.check_invariants().unwrap();
}

/// Whether the session would still be alive at `now` (looks, does not refresh).
fn alive_at(t: &NatTable<Ipv4Addr>, o: &Translation<Ipv4Addr>, now: u64) -> bool {
    t.session(o.session).is_some_and(|v| now < v.expires_at_ns)
}

#[test]
fn udp_timeout_refreshed_both_ways() {
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 0, &mut rng)
        .unwrap();
    assert!(alive_at(&t, &o, 300 * S - 1));
    assert!(!alive_at(&t, &o, 300 * S));
    // Inbound refreshes (RFC 4787 REQ-6 permits it; we do it).
    assert!(t
        .inbound(Proto::Udp, (R1, 53), o.outside, 0, 200 * S)
        .is_some());
    assert!(t
        .inbound(Proto::Udp, (R1, 53), o.outside, 0, 499 * S)
        .is_some());
    // Outbound refreshes.
    t.outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 700 * S, &mut rng)
        .unwrap();
    assert_eq!(t.expire(999 * S, 100), 0);
    assert_eq!(t.expire(1000 * S, 100), 1);
    assert_eq!(t.session_count(), 0);
    assert_eq!(t.mapping_count(), 0);
    assert_eq!(t.stats().expired, 1);
}

#[test]
fn dead_session_refuses_inbound_before_the_sweep() {
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 0, &mut rng)
        .unwrap();
    assert_eq!(t.inbound(Proto::Udp, (R1, 53), o.outside, 0, 300 * S), None);
    assert_eq!(t.session_count(), 0, "found dead, removed on the spot");
    assert_eq!(t.mapping_count(), 0);
    t.check_invariants().unwrap();
}

#[test]
fn dead_session_is_replaced_by_outbound() {
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 0, &mut rng)
        .unwrap();
    t.record(o.session, 100);
    let o2 = t
        .outbound(Proto::Udp, (H1, 5000), (R1, 53), 0, 300 * S, &mut rng)
        .unwrap();
    assert_ne!(o2.session, o.session);
    assert_eq!(t.session(o.session), None);
    let v = t.session(o2.session).unwrap();
    assert_eq!((v.packets, v.bytes, v.last_seen_ns), (0, 0, 300 * S));
    assert_eq!(t.session_count(), 1);
    let s = t.stats();
    assert_eq!((s.created, s.expired), (2, 1));
    t.check_invariants().unwrap();
}

#[test]
fn icmp_timeout() {
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Icmp, (H1, 1), (R1, 0), 0, 10 * S, &mut rng)
        .unwrap();
    assert_eq!(t.session(o.session).unwrap().expires_at_ns, 70 * S);
    assert!(t
        .inbound(Proto::Icmp, (R1, 0), o.outside, 0, 69 * S)
        .is_some());
    assert_eq!(t.expire(128 * S, 10), 0);
    assert_eq!(t.expire(129 * S, 10), 1);
}

fn tcp_state(t: &NatTable<Ipv4Addr>, o: &Translation<Ipv4Addr>) -> (TcpState, u64) {
    let v = t.session(o.session).unwrap();
    (v.tcp_state.unwrap(), v.expires_at_ns - v.last_seen_ns)
}

#[test]
fn tcp_handshake_and_close() {
    let to = Timeouts::default();
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
        .unwrap();
    assert_eq!(tcp_state(&t, &o), (TcpState::Opening, to.tcp_transitory_ns));
    // Retransmitted SYN: still opening.
    t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, S, &mut rng)
        .unwrap();
    assert_eq!(tcp_state(&t, &o).0, TcpState::Opening);
    t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_SYN | TCP_ACK, 2 * S)
        .unwrap();
    assert_eq!(
        tcp_state(&t, &o),
        (TcpState::Established, to.tcp_established_ns)
    );
    assert_eq!(
        t.session(o.session).unwrap().established_since_ns,
        Some(2 * S)
    );
    t.outbound(
        Proto::Tcp,
        (H1, 40000),
        (R1, 80),
        TCP_FIN | TCP_ACK,
        3 * S,
        &mut rng,
    )
    .unwrap();
    assert_eq!(
        tcp_state(&t, &o),
        (TcpState::FinOutbound, to.tcp_established_ns)
    );
    t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_FIN | TCP_ACK, 4 * S)
        .unwrap();
    assert_eq!(tcp_state(&t, &o), (TcpState::Closing, to.tcp_transitory_ns));
    // The last ACK keeps it closing.
    t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_ACK, 5 * S, &mut rng)
        .unwrap();
    assert_eq!(tcp_state(&t, &o).0, TcpState::Closing);
    assert_eq!(t.expire(5 * S + 240 * S - 1, 10), 0);
    assert_eq!(t.expire(5 * S + 240 * S, 10), 1);
}

#[test]
fn tcp_fin_from_outside_first() {
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
        .unwrap();
    t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_SYN | TCP_ACK, 1)
        .unwrap();
    t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_FIN, 2)
        .unwrap();
    assert_eq!(tcp_state(&t, &o).0, TcpState::FinInbound);
    t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_FIN, 3, &mut rng)
        .unwrap();
    assert_eq!(tcp_state(&t, &o).0, TcpState::Closing);
}

#[test]
fn tcp_rst_is_transitory_and_recovers() {
    let to = Timeouts::default();
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
        .unwrap();
    t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_SYN | TCP_ACK, 1)
        .unwrap();
    t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_RST, 2)
        .unwrap();
    assert_eq!(tcp_state(&t, &o), (TcpState::Reset, to.tcp_transitory_ns));
    // Any later non-RST packet reopens (RFC 6146 TRANS state).
    t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_ACK, 3, &mut rng)
        .unwrap();
    assert_eq!(tcp_state(&t, &o).0, TcpState::Established);
    t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_RST, 4, &mut rng)
        .unwrap();
    assert_eq!(tcp_state(&t, &o).0, TcpState::Reset);
    // A fresh SYN from inside after a RST starts over.
    t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 5, &mut rng)
        .unwrap();
    assert_eq!(tcp_state(&t, &o).0, TcpState::Opening);
    assert_eq!(t.session(o.session).unwrap().established_since_ns, None);
    // Transitory lifetime: dies 4 min after the last packet.
    assert_eq!(t.expire(5 + 240 * S, 10), 1);
}

#[test]
fn tcp_established_timeout() {
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
        .unwrap();
    t.inbound(Proto::Tcp, (R1, 80), o.outside, TCP_SYN | TCP_ACK, S)
        .unwrap();
    // Unanswered SYNs only get the transitory lifetime; established ones 2h4m.
    assert_eq!(t.expire(S + 7440 * S - 1, 10), 0);
    assert!(t
        .inbound(Proto::Tcp, (R1, 80), o.outside, TCP_ACK, S + 7440 * S - 1)
        .is_some());
    assert_eq!(t.expire(2 * S + 2 * 7440 * S, 10), 1);
}

#[test]
fn tcp_unanswered_syn_expires_quickly() {
    let (mut t, mut rng) = small();
    t.outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
        .unwrap();
    // A mid-stream packet from inside opens a session too, transitory until answered.
    let o = t
        .outbound(Proto::Tcp, (H1, 40001), (R1, 80), TCP_ACK, 0, &mut rng)
        .unwrap();
    assert_eq!(tcp_state(&t, &o).0, TcpState::Opening);
    assert_eq!(t.expire(240 * S - 1, 10), 0);
    assert_eq!(t.expire(240 * S, 10), 2);
    assert_eq!(t.mapping_count(), 0);
}

#[test]
fn tcp_inbound_syn_without_session_is_dropped() {
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Tcp, (H1, 40000), (R1, 80), TCP_SYN, 0, &mut rng)
        .unwrap();
    assert_eq!(t.inbound(Proto::Tcp, (R2, 80), o.outside, TCP_SYN, 1), None);
    assert_eq!(
        t.inbound(Proto::Tcp, (R1, 80), (POOL_A, 1), TCP_SYN, 1),
        None
    );
    assert_eq!(t.session_count(), 1);
}

#[test]
fn port_exhaustion_creates_nothing() {
    let (mut t, mut rng) = table(cfg(vec![POOL_A], (2000, 2001), 16, 16));
    let a = t
        .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
        .unwrap();
    let b = t
        .outbound(Proto::Udp, (H1, 2), (R1, 1), 0, 0, &mut rng)
        .unwrap();
    let mut ports = [a.outside.1, b.outside.1];
    ports.sort_unstable();
    assert_eq!(ports, [2000, 2001]);
    let before = t.stats();
    assert_eq!(
        t.outbound(Proto::Udp, (H2, 3), (R1, 1), 0, 0, &mut rng),
        Err(NatError::PortsExhausted { addr: POOL_A })
    );
    let after = t.stats();
    assert_eq!(after.sessions, before.sessions);
    assert_eq!(after.mappings, before.mappings);
    assert_eq!(after.created, before.created);
    assert_eq!(after.port_exhausted, 1);
    // Existing mappings still take new sessions; other protocols have their own ports.
    t.outbound(Proto::Udp, (H1, 1), (R2, 1), 0, 0, &mut rng)
        .unwrap();
    t.outbound(Proto::Tcp, (H2, 3), (R1, 1), TCP_SYN, 0, &mut rng)
        .unwrap();
    t.check_invariants().unwrap();
}

#[test]
fn session_table_full_creates_nothing() {
    let (mut t, mut rng) = table(cfg(vec![POOL_A], (1024, 65535), 2, 16));
    t.outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
        .unwrap();
    t.outbound(Proto::Udp, (H1, 1), (R2, 1), 0, 0, &mut rng)
        .unwrap();
    assert_eq!(
        t.outbound(Proto::Udp, (H2, 1), (R1, 1), 0, 0, &mut rng),
        Err(NatError::SessionTableFull { capacity: 2 })
    );
    assert_eq!(t.mapping_count(), 1, "no mapping left behind");
    assert_eq!(t.stats().table_full, 1);
    // Known flows still pass.
    assert!(t
        .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 1, &mut rng)
        .is_ok());
    t.check_invariants().unwrap();
}

#[test]
fn mapping_table_full_creates_nothing() {
    let (mut t, mut rng) = table(cfg(vec![POOL_A], (1024, 65535), 16, 1));
    t.outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
        .unwrap();
    assert_eq!(
        t.outbound(Proto::Udp, (H1, 2), (R1, 1), 0, 0, &mut rng),
        Err(NatError::MappingTableFull { capacity: 1 })
    );
    assert_eq!((t.session_count(), t.mapping_count()), (1, 1));
    // The one mapping still gets sessions to other remotes.
    t.outbound(Proto::Udp, (H1, 1), (R2, 1), 0, 0, &mut rng)
        .unwrap();
    t.check_invariants().unwrap();
}

#[test]
fn expiry_frees_ports_for_reuse() {
    let (mut t, mut rng) = table(cfg(vec![POOL_A], (3000, 3000), 4, 4));
    let a = t
        .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
        .unwrap();
    assert_eq!(a.outside, (POOL_A, 3000));
    assert!(matches!(
        t.outbound(Proto::Udp, (H2, 1), (R1, 1), 0, S, &mut rng),
        Err(NatError::PortsExhausted { .. })
    ));
    assert_eq!(t.expire(300 * S, 10), 1);
    assert_eq!(t.mapping_count(), 0);
    let b = t
        .outbound(Proto::Udp, (H2, 1), (R1, 1), 0, 301 * S, &mut rng)
        .unwrap();
    assert_eq!(b.outside, (POOL_A, 3000));
    // The old handle does not resolve to the new session that reused its slot.
    assert_eq!(t.session(a.session), None);
    assert!(t.session(b.session).is_some());
    assert!(!t.refresh(a.session, 301 * S));
    assert!(!t.record(a.session, 1));
    t.check_invariants().unwrap();
}

#[test]
fn mapping_lives_while_it_has_sessions() {
    let (mut t, mut rng) = small();
    let a = t
        .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
        .unwrap();
    t.outbound(Proto::Udp, (H1, 1), (R2, 1), 0, 200 * S, &mut rng)
        .unwrap();
    assert_eq!(t.expire(300 * S, 10), 1);
    assert_eq!(t.mapping_count(), 1);
    assert_eq!(t.mapping(Proto::Udp, (H1, 1)), Some(a.outside));
    // Still EIM: a new remote reuses the surviving mapping.
    let c = t
        .outbound(Proto::Udp, (H1, 1), (R3, 1), 0, 300 * S, &mut rng)
        .unwrap();
    assert_eq!(c.outside, a.outside);
    assert_eq!(t.expire(600 * S, 10), 2);
    assert_eq!(t.mapping_count(), 0);
    assert_eq!(t.mapping(Proto::Udp, (H1, 1)), None);
}

#[test]
fn sweep_budget_is_respected() {
    let (mut t, mut rng) = small();
    for p in 0..10 {
        t.outbound(Proto::Udp, (H1, p), (R1, 1), 0, 0, &mut rng)
            .unwrap();
    }
    // One that stays alive.
    t.outbound(Proto::Udp, (H2, 1), (R1, 1), 0, 100 * S, &mut rng)
        .unwrap();
    let mut removed = Vec::new();
    let now = 300 * S;
    assert_eq!(t.expire(now, 0), 0);
    for _ in 0..10 {
        let n = t.expire_with(now, 3, |v| removed.push(v.inside));
        assert!(n <= 3);
        t.check_invariants().unwrap();
    }
    assert_eq!(removed.len(), 10);
    assert_eq!(t.session_count(), 1);
    assert!(!removed.contains(&(H2, 1)));
    assert_eq!(t.stats().expired, 10);
}

#[test]
fn sweep_visits_at_most_budget_sessions() {
    let (mut t, mut rng) = small();
    for p in 0..20 {
        t.outbound(Proto::Udp, (H1, p), (R1, 1), 0, p as u64 * S, &mut rng)
            .unwrap();
    }
    // At 305 s the first six (created at 0..=5 s) are dead; a budget of 4 from the start
    // of the list can remove at most 4 of them.
    let n = t.expire(305 * S, 4);
    assert!(n <= 4);
    let mut total = n;
    for _ in 0..20 {
        total += t.expire(305 * S, 4);
    }
    assert_eq!(total, 6);
    t.check_invariants().unwrap();
}

#[test]
fn offload_hooks() {
    let (mut t, mut rng) = small();
    let tcp = t
        .outbound(Proto::Tcp, (H1, 40000), (R1, 443), TCP_SYN, 0, &mut rng)
        .unwrap();
    let udp = t
        .outbound(Proto::Udp, (H1, 5000), (R1, 4500), 0, 0, &mut rng)
        .unwrap();
    let icmp = t
        .outbound(Proto::Icmp, (H1, 9), (R1, 0), 0, 0, &mut rng)
        .unwrap();
    let one_way = t
        .outbound(Proto::Udp, (H1, 5001), (R1, 4500), 0, 0, &mut rng)
        .unwrap();
    assert_eq!(
        t.offload_candidates(100 * S, 0).count(),
        0,
        "nothing established"
    );
    t.inbound(Proto::Tcp, (R1, 443), tcp.outside, TCP_SYN | TCP_ACK, S)
        .unwrap();
    t.inbound(Proto::Udp, (R1, 4500), udp.outside, 0, 2 * S)
        .unwrap();
    t.inbound(Proto::Icmp, (R1, 0), icmp.outside, 0, 2 * S)
        .unwrap();
    let ids = |t: &NatTable<Ipv4Addr>, now, age| {
        let mut v: Vec<SessionId> = t.offload_candidates(now, age).map(|v| v.id).collect();
        v.sort_unstable();
        v
    };
    let mut both = vec![tcp.session, udp.session];
    both.sort_unstable();
    assert_eq!(ids(&t, 10 * S, 5 * S), both);
    assert_eq!(ids(&t, 10 * S, 9 * S), vec![tcp.session]);
    assert!(!ids(&t, 10 * S, 0).contains(&one_way.session));
    assert!(t.mark_offloaded(tcp.session, true));
    assert_eq!(ids(&t, 10 * S, 5 * S), vec![udp.session]);
    // The agent feeds hardware counters back.
    assert!(t.record(tcp.session, 1500));
    assert!(t.record_many(tcp.session, 10, 15000));
    let v = t.session(tcp.session).unwrap();
    assert_eq!((v.packets, v.bytes, v.offloaded), (11, 16500, true));
    // Refresh keeps an offloaded session alive far beyond its last software packet.
    let mut now = S;
    for _ in 0..5 {
        now += 7000 * S;
        assert!(t.refresh(tcp.session, now));
        t.expire(now, usize::MAX);
    }
    assert!(t.session(tcp.session).is_some());
    // Without refresh it ages out like any other and is reported to the agent.
    let mut gone = Vec::new();
    t.expire_with(now + 7440 * S, usize::MAX, |v| {
        if v.offloaded {
            gone.push(v.id);
        }
    });
    assert_eq!(gone, vec![tcp.session]);
    assert!(!t.refresh(tcp.session, now + 7440 * S));
    assert!(!t.mark_offloaded(tcp.session, false));
    // A dead session cannot be refreshed back to life.
    let (mut t, mut rng) = small();
    let u = t
        .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
        .unwrap();
    assert!(!t.refresh(u.session, 300 * S));
    assert!(t.refresh(u.session, 299 * S));
    assert_eq!(t.session(u.session).unwrap().expires_at_ns, 599 * S);
}

#[test]
fn fin_leaves_offload_candidates() {
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Tcp, (H1, 40000), (R1, 443), TCP_SYN, 0, &mut rng)
        .unwrap();
    t.inbound(Proto::Tcp, (R1, 443), o.outside, TCP_SYN | TCP_ACK, 0)
        .unwrap();
    assert_eq!(t.offload_candidates(S, 0).count(), 1);
    t.inbound(Proto::Tcp, (R1, 443), o.outside, TCP_FIN, S)
        .unwrap();
    assert_eq!(t.offload_candidates(2 * S, 0).count(), 0);
}

#[test]
fn session_ids_carry_generations() {
    let (mut t, mut rng) = table(cfg(vec![POOL_A], (1024, 65535), 1, 1));
    let mut seen = HashSet::new();
    let mut now = 0;
    for i in 0..300u16 {
        let o = t
            .outbound(Proto::Udp, (H1, i), (R1, 1), 0, now, &mut rng)
            .unwrap();
        assert!(seen.insert(o.session), "id reused at {i}");
        now += 300 * S;
    }
    for id in &seen {
        assert_eq!(SessionId::from_raw(id.to_raw()), *id);
    }
    assert_eq!(t.session(SessionId::from_raw(u32::MAX)), None);
    for raw in [0, 1, 2, 0xFFFF_FFFE, 0x8000_0000] {
        let _ = t.session(SessionId::from_raw(raw));
        let _ = t.refresh(SessionId::from_raw(raw), 0);
    }
}

#[test]
fn time_going_backwards_is_harmless() {
    let (mut t, mut rng) = small();
    let o = t
        .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 1000 * S, &mut rng)
        .unwrap();
    assert!(t
        .inbound(Proto::Udp, (R1, 1), o.outside, 0, 10 * S)
        .is_some());
    assert_eq!(t.session(o.session).unwrap().last_seen_ns, 1000 * S);
    assert_eq!(t.expire(0, 10), 0);
    assert_eq!(t.expire(u64::MAX, 10), 1);
}

#[test]
fn hash_depends_on_seed() {
    let mut r1 = XorShift32(1);
    let mut r2 = XorShift32(2);
    let a: NatTable<Ipv4Addr> = NatTable::new(cfg(vec![POOL_A], (1, 10), 1, 1), &mut r1).unwrap();
    let b: NatTable<Ipv4Addr> = NatTable::new(cfg(vec![POOL_A], (1, 10), 1, 1), &mut r2).unwrap();
    assert_ne!(
        a.hash_map(Proto::Udp, (H1, 1)),
        b.hash_map(Proto::Udp, (H1, 1))
    );
    assert_ne!(
        a.hash_map(Proto::Udp, (H1, 1)),
        a.hash_map(Proto::Udp, (H1, 2))
    );
    assert_ne!(
        a.hash_map(Proto::Udp, (H1, 1)),
        a.hash_map(Proto::Tcp, (H1, 1))
    );
    let _ = format!("{a:?}");
}

#[test]
fn full_port_range_on_many_addresses() {
    // Exhaust a 100-port range completely and refill it after expiry: the bounded scan
    // finds every last port.
    let (mut t, mut rng) = table(cfg(vec![POOL_A], (60000, 60099), 200, 200));
    let mut ports = HashSet::new();
    for i in 0..100u16 {
        let o = t
            .outbound(Proto::Tcp, (H1, i), (R1, 1), TCP_SYN, 0, &mut rng)
            .unwrap();
        assert!(ports.insert(o.outside.1));
    }
    assert!(t
        .outbound(Proto::Tcp, (H1, 100), (R1, 1), TCP_SYN, 0, &mut rng)
        .is_err());
    assert_eq!(t.expire(240 * S, usize::MAX), 100);
    for i in 0..100u16 {
        t.outbound(Proto::Tcp, (H2, i), (R1, 1), TCP_SYN, 241 * S, &mut rng)
            .unwrap();
    }
    t.check_invariants().unwrap();
}

// --- the NAT against a reference model ---------------------------------------------------

/// Time steps in seconds: mostly small, so flows live through many packets. Packets use
/// the first 12 (up to 61 s), sweeps all of them.
const DTS: [u64; 16] = [0, 0, 0, 0, 1, 1, 1, 2, 5, 20, 59, 61, 239, 241, 301, 7441];
const FLAGS: [u8; 6] = [
    0,
    TCP_SYN,
    TCP_SYN | TCP_ACK,
    TCP_ACK,
    TCP_FIN | TCP_ACK,
    TCP_RST,
];
const MPOOL: [Ipv4Addr; 2] = [POOL_A, POOL_B];
const MRANGE: (u16, u16) = (1000, 1099);

/// Nine known remotes; anything above is a stranger.
fn remote_of(i: u8) -> (Ipv4Addr, u16) {
    let addrs = [R1, R2, R3];
    if i >= 9 {
        return (Ipv4Addr::new(192, 0, 2, 99), 9);
    }
    (addrs[usize::from(i % 3)], 7000 + u16::from(i / 3))
}

#[derive(Debug, Clone)]
enum Op {
    Out {
        proto: u8,
        host: u8,
        hport: u8,
        remote: u8,
        flags: u8,
        dt: u8,
        reuse: u8,
    },
    In {
        proto: u8,
        remote: u8,
        target: u16,
        flags: u8,
        dt: u8,
    },
    Expire {
        dt: u8,
        budget: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u8..3, 0u8..3, 0u8..6, 0u8..6, 0u8..12, any::<u8>()).prop_map(
            |(proto, host, hport, remote, flags, dt, reuse)| Op::Out { proto, host, hport, remote, flags, dt, reuse }
        ),
        4 => (0u8..3, 0u8..10, any::<u16>(), 0u8..6, 0u8..12).prop_map(
            |(proto, remote, target, flags, dt)| Op::In { proto, remote, target, flags, dt }
        ),
        1 => (0u8..16, 0u8..8).prop_map(|(dt, budget)| Op::Expire { dt, budget }),
    ]
}

/// The reference model's TCP state, kept as independent facts rather than a state enum.
#[derive(Debug, Clone, Copy, Default)]
struct MTcp {
    est: bool,
    fin_out: bool,
    fin_in: bool,
    rst: bool,
}

impl MTcp {
    fn apply(&mut self, out: bool, flags: u8) {
        if flags & TCP_RST != 0 {
            self.rst = true;
            return;
        }
        let syn = flags & TCP_SYN != 0;
        let closing = self.fin_in && self.fin_out;
        if out && syn && (self.rst || closing) {
            *self = MTcp::default();
        } else if self.rst {
            *self = MTcp {
                est: true,
                ..MTcp::default()
            };
        }
        if !out {
            self.est = true;
        }
        if flags & TCP_FIN != 0 && self.est {
            if out {
                self.fin_out = true;
            } else {
                self.fin_in = true;
            }
        }
    }

    fn transitory(&self) -> bool {
        self.rst || !self.est || (self.fin_in && self.fin_out)
    }

    fn as_state(&self) -> TcpState {
        if self.rst {
            TcpState::Reset
        } else if !self.est {
            TcpState::Opening
        } else if self.fin_in && self.fin_out {
            TcpState::Closing
        } else if self.fin_out {
            TcpState::FinOutbound
        } else if self.fin_in {
            TcpState::FinInbound
        } else {
            TcpState::Established
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct MSession {
    id: SessionId,
    outside: (Ipv4Addr, u16),
    tcp: MTcp,
    last: u64,
}

type MKey = (Proto, (Ipv4Addr, u16), (Ipv4Addr, u16));
type Flow = (Proto, (Ipv4Addr, u16), (Ipv4Addr, u16), (Ipv4Addr, u16));

struct Model {
    t: Timeouts,
    sessions: HashMap<MKey, MSession>,
    paired: HashMap<Ipv4Addr, Ipv4Addr>,
}

impl Model {
    fn alive(&self, k: &MKey, s: &MSession, now: u64) -> bool {
        let life = match k.0 {
            Proto::Udp => self.t.udp_ns,
            Proto::Icmp => self.t.icmp_ns,
            Proto::Tcp if s.tcp.transitory() => self.t.tcp_transitory_ns,
            Proto::Tcp => self.t.tcp_established_ns,
        };
        now < s.last + life
    }

    fn live_mapping(
        &self,
        proto: Proto,
        inside: (Ipv4Addr, u16),
        now: u64,
    ) -> Option<(Ipv4Addr, u16)> {
        self.sessions
            .iter()
            .find(|(k, s)| k.0 == proto && k.1 == inside && self.alive(k, s, now))
            .map(|(_, s)| s.outside)
    }

    fn live_mappings(&self, now: u64) -> HashMap<(Proto, (Ipv4Addr, u16)), (Ipv4Addr, u16)> {
        self.sessions
            .iter()
            .filter(|(k, s)| self.alive(k, s, now))
            .map(|(k, s)| ((k.0, k.1), s.outside))
            .collect()
    }
}

fn run_against_model(seed: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut rng = XorShift32(seed);
    let c = cfg(MPOOL.to_vec(), MRANGE, 512, 512);
    let mut nat: NatTable<Ipv4Addr> = NatTable::new(c, &mut rng).unwrap();
    let mut m = Model {
        t: Timeouts::default(),
        sessions: HashMap::new(),
        paired: HashMap::new(),
    };
    // Flows opened so far: (proto, inside, outside, remote as passed).
    let mut observed: Vec<Flow> = Vec::new();
    let mut now = 0u64;
    for op in ops {
        match op {
            Op::Out {
                proto,
                host,
                hport,
                remote,
                flags,
                dt,
                reuse,
            } => {
                now += DTS[usize::from(dt)] * S;
                // Mostly continue a recent flow, else a new or older one.
                let recent = observed
                    .len()
                    .checked_sub(1 + usize::from(reuse % 8))
                    .and_then(|i| observed.get(i).copied())
                    .filter(|_| reuse < 192);
                let (proto, inside, raw_remote) = match recent {
                    Some((p, ins, _, r)) => (p, ins, r),
                    None => (
                        Proto::ALL[usize::from(proto)],
                        (Ipv4Addr::new(10, 0, 0, host + 1), 100 + u16::from(hport)),
                        remote_of(remote),
                    ),
                };
                let remote = if proto == Proto::Icmp {
                    (raw_remote.0, 0)
                } else {
                    raw_remote
                };
                let flags = if proto == Proto::Tcp {
                    FLAGS[usize::from(flags)]
                } else {
                    0
                };
                let expected_map = m.live_mapping(proto, inside, now);
                let live_before = m.live_mappings(now);
                let key = (proto, inside, remote);
                let r = nat.outbound(proto, inside, raw_remote, flags, now, &mut rng);
                let tr = r.map_err(|e| TestCaseError::fail(format!("outbound failed: {e}")))?;
                prop_assert_eq!(tr.inside, inside);
                prop_assert_eq!(tr.remote, remote);
                match expected_map {
                    Some(out) => prop_assert_eq!(tr.outside, out, "EIM broken"),
                    None => {
                        prop_assert!(MPOOL.contains(&tr.outside.0));
                        prop_assert!(tr.outside.1 >= MRANGE.0 && tr.outside.1 <= MRANGE.1);
                        for ((p, ins), out) in &live_before {
                            if *p == proto && *ins != inside {
                                prop_assert_ne!(*out, tr.outside, "outside endpoint shared");
                            }
                        }
                    }
                }
                let paired = *m.paired.entry(inside.0).or_insert(tr.outside.0);
                prop_assert_eq!(paired, tr.outside.0, "pairing broken");
                let existing = m
                    .sessions
                    .get(&key)
                    .copied()
                    .filter(|s| m.alive(&key, s, now));
                let s = match existing {
                    Some(mut s) => {
                        prop_assert_eq!(s.id, tr.session);
                        s.tcp.apply(true, flags);
                        s.last = s.last.max(now);
                        s
                    }
                    None => {
                        let mut tcp = MTcp::default();
                        tcp.apply(true, flags);
                        MSession {
                            id: tr.session,
                            outside: tr.outside,
                            tcp,
                            last: now,
                        }
                    }
                };
                m.sessions.insert(key, s);
                observed.push((proto, inside, tr.outside, raw_remote));
            }
            Op::In {
                proto,
                remote,
                target,
                flags,
                dt,
            } => {
                now += DTS[usize::from(dt)] * S;
                // Mostly answer a flow that was opened (its protocol, outside endpoint and
                // remote); sometimes a stranger, another protocol or an unused port.
                let pick = observed
                    .len()
                    .checked_sub(1 + usize::from(target % 8))
                    .and_then(|i| observed.get(i).copied());
                let (proto, outside, raw_remote) = match (pick, target % 16) {
                    (Some((p, _, o, r)), 0..=10) => (p, o, r),
                    (Some((p, _, o, _)), 11..=12) => (p, o, remote_of(remote)),
                    (Some((_, _, o, r)), 13) => (Proto::ALL[usize::from(proto)], o, r),
                    _ => (
                        Proto::ALL[usize::from(proto)],
                        (MPOOL[usize::from(target & 1)], MRANGE.0 + target % 120),
                        remote_of(remote),
                    ),
                };
                let remote = if proto == Proto::Icmp {
                    (raw_remote.0, 0)
                } else {
                    raw_remote
                };
                let flags = if proto == Proto::Tcp {
                    FLAGS[usize::from(flags)]
                } else {
                    0
                };
                let hit = m
                    .sessions
                    .iter()
                    .find(|(k, s)| {
                        k.0 == proto && k.2 == remote && s.outside == outside && m.alive(k, s, now)
                    })
                    .map(|(k, s)| (*k, *s));
                let r = nat.inbound(proto, raw_remote, outside, flags, now);
                match hit {
                    None => prop_assert_eq!(r, None),
                    Some((k, mut s)) => {
                        let r =
                            r.ok_or_else(|| TestCaseError::fail("APDF refused a live session"))?;
                        prop_assert_eq!(r.inside, k.1);
                        prop_assert_eq!(r.session, s.id);
                        prop_assert_eq!(r.outside, outside);
                        s.tcp.apply(false, flags);
                        s.last = s.last.max(now);
                        m.sessions.insert(k, s);
                    }
                }
            }
            Op::Expire { dt, budget } => {
                now += DTS[usize::from(dt)] * S;
                let budget = usize::from(budget) * 3;
                let mut visited_dead = true;
                let n = nat.expire_with(now, budget, |v| {
                    visited_dead &= now >= v.expires_at_ns;
                });
                prop_assert!(n <= budget);
                prop_assert!(visited_dead, "a live session was expired");
            }
        }
        // Every live model session is in the table, unchanged.
        for (k, s) in &m.sessions {
            if !m.alive(k, s, now) {
                continue;
            }
            let v = nat
                .session(s.id)
                .ok_or_else(|| TestCaseError::fail("live session missing"))?;
            prop_assert_eq!(
                (v.proto, v.inside, v.remote, v.outside),
                (k.0, k.1, k.2, s.outside)
            );
            if k.0 == Proto::Tcp {
                prop_assert_eq!(v.tcp_state, Some(s.tcp.as_state()));
            }
            prop_assert!(now < v.expires_at_ns);
        }
        nat.check_invariants().map_err(TestCaseError::fail)?;
    }
    // Drain: everything goes, every port comes back.
    now += 10 * 7440 * S;
    nat.expire(now, usize::MAX);
    prop_assert_eq!(nat.session_count(), 0);
    prop_assert_eq!(nat.mapping_count(), 0);
    nat.check_invariants().map_err(TestCaseError::fail)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn nat_matches_reference_model(seed in any::<u32>(), ops in prop::collection::vec(op(), 1..120)) {
        run_against_model(seed, ops)?;
    }

    #[test]
    fn tiny_tables_never_break_invariants(
        seed in any::<u32>(),
        ops in prop::collection::vec(op(), 1..200),
        sessions in 1usize..6,
        mappings in 1usize..6,
        ports in 0u16..4,
    ) {
        // Errors are expected here; the point is that nothing half-created is left behind
        // and no two mappings share an outside endpoint.
        let mut rng = XorShift32(seed);
        let c = cfg(vec![POOL_A], (5000, 5000 + ports), sessions, mappings);
        let mut nat: NatTable<Ipv4Addr> = NatTable::new(c, &mut rng).unwrap();
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Out { proto, host, hport, remote, flags, dt, .. } => {
                    now += DTS[usize::from(dt)] * S;
                    let before = (nat.session_count(), nat.mapping_count());
                    let r = nat.outbound(
                        Proto::ALL[usize::from(proto)],
                        (Ipv4Addr::new(10, 0, 0, host), u16::from(hport)),
                        remote_of(remote),
                        FLAGS[usize::from(flags)],
                        now,
                        &mut rng,
                    );
                    if r.is_err() {
                        // Only dead sessions may have been cleared on the way.
                        prop_assert!(nat.session_count() <= before.0);
                        prop_assert!(nat.mapping_count() <= before.1);
                    }
                }
                Op::In { proto, remote, target, flags, dt } => {
                    now += DTS[usize::from(dt)] * S;
                    let _ = nat.inbound(
                        Proto::ALL[usize::from(proto)],
                        remote_of(remote),
                        (POOL_A, 5000 + target % 5),
                        FLAGS[usize::from(flags)],
                        now,
                    );
                }
                Op::Expire { dt, budget } => {
                    now += DTS[usize::from(dt)] * S;
                    prop_assert!(nat.expire(now, usize::from(budget)) <= usize::from(budget));
                }
            }
            nat.check_invariants().map_err(TestCaseError::fail)?;
        }
    }
}

// --- allocation blocks and sync --------------------------------------------------------------

#[test]
fn block_validation() {
    let ok = cfg(vec![POOL_A], (1024, 1027), 8, 8);
    let mut rng = XorShift32(1);
    for (block, e) in [
        (
            AllocBlock::new(0, 0),
            NatConfigError::BadBlock { index: 0, count: 0 },
        ),
        (
            AllocBlock::new(2, 2),
            NatConfigError::BadBlock { index: 2, count: 2 },
        ),
        (
            AllocBlock::new(0, 5),
            NatConfigError::EmptyBlock {
                index: 0,
                count: 5,
                ports: 4,
            },
        ),
    ] {
        let c = NatConfig {
            block,
            ..ok.clone()
        };
        assert_eq!(
            NatTable::<Ipv4Addr>::new(c, &mut rng).err(),
            Some(NatError::Config(e))
        );
    }
    let (mut t, mut rng) = table(NatConfig {
        block: AllocBlock::new(3, 4),
        ..ok
    });
    let o = t
        .outbound(Proto::Udp, (H1, 1), (R1, 1), 0, 0, &mut rng)
        .unwrap();
    assert_eq!(o.outside, (POOL_A, 1027));
    assert_eq!(
        t.outbound(Proto::Udp, (H1, 2), (R1, 1), 0, 0, &mut rng),
        Err(NatError::PortsExhausted { addr: POOL_A })
    );
    t.check_invariants().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// A serves flows (model ops) in block 0/2 of a tiny range; B, in block 1/2, imports A's
    /// sessions now and then while serving its own traffic, sweeping, and applying deletes.
    /// Whatever the errors, B's internal invariants hold after every step, imports never
    /// disturb B's own sessions, and two mappings never share an outside endpoint.
    #[test]
    fn imports_keep_invariants(
        seed in any::<u32>(),
        ops in prop::collection::vec((op(), 0u8..6), 1..150),
    ) {
        let mut rng = XorShift32(seed);
        let mk = |block| NatConfig {
            block,
            ..cfg(MPOOL.to_vec(), (1000, 1011), 24, 24)
        };
        let mut a: NatTable<Ipv4Addr> = NatTable::new(mk(AllocBlock::new(0, 2)), &mut rng).unwrap();
        let mut b: NatTable<Ipv4Addr> = NatTable::new(mk(AllocBlock::new(1, 2)), &mut rng).unwrap();
        let mut now = 0u64;
        for (op, sync) in ops {
            // The op on A or on B (B's own traffic).
            let t = if sync % 2 == 0 { &mut a } else { &mut b };
            match op {
                Op::Out { proto, host, hport, remote, flags, dt, .. } => {
                    now += DTS[usize::from(dt)] * S;
                    let _ = t.outbound(
                        Proto::ALL[usize::from(proto)],
                        (Ipv4Addr::new(10, 0, 0, host), u16::from(hport)),
                        remote_of(remote),
                        FLAGS[usize::from(flags)],
                        now,
                        &mut rng,
                    );
                }
                Op::In { proto, remote, target, flags, dt } => {
                    now += DTS[usize::from(dt)] * S;
                    let _ = t.inbound(
                        Proto::ALL[usize::from(proto)],
                        remote_of(remote),
                        (MPOOL[usize::from(target & 1)], 1000 + target % 12),
                        FLAGS[usize::from(flags)],
                        now,
                    );
                }
                Op::Expire { dt, budget } => {
                    now += DTS[usize::from(dt)] * S;
                    t.expire(now, usize::from(budget));
                }
            }
            match sync {
                // Sync everything A has to B.
                0 | 1 => {
                    for r in a.sessions_export(now).collect::<Vec<_>>() {
                        let before: Vec<_> = b.sessions().filter(|v| now < v.expires_at_ns).collect();
                        match b.import(&r, now) {
                            Ok(id) => {
                                let v = b.session(id).unwrap();
                                prop_assert_eq!((v.proto, v.inside, v.outside, v.remote), (r.proto, r.inside, r.outside, r.remote));
                                prop_assert!(now < v.expires_at_ns);
                            }
                            Err(ImportError::MappingConflict { .. } | ImportError::OutsideInUse { .. }
                                | ImportError::SessionTableFull { .. } | ImportError::MappingTableFull { .. }) => {}
                            Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
                        }
                        // Live sessions of B other than the imported flow are untouched.
                        for v in before {
                            if (v.proto, v.inside, v.remote) != (r.proto, r.inside, r.remote) {
                                let w = b.session(v.id).ok_or_else(|| TestCaseError::fail("a live session vanished"))?;
                                prop_assert_eq!(w, v);
                            }
                        }
                        b.check_invariants().map_err(TestCaseError::fail)?;
                    }
                }
                // A delete event for one of A's sessions.
                2 => {
                    let first = a.sessions_export(now).next();
                    if let Some(r) = first {
                        a.remove_session(r.proto, r.inside, r.remote);
                        b.remove_session(r.proto, r.inside, r.remote);
                    }
                }
                _ => {}
            }
            a.check_invariants().map_err(TestCaseError::fail)?;
            b.check_invariants().map_err(TestCaseError::fail)?;
            // B's own mappings come from its block; A never uses B's.
            let (lo, hi) = AllocBlock::new(1, 2).ports((1000, 1011)).unwrap();
            for v in a.sessions() {
                prop_assert!(v.outside.1 < lo || v.outside.1 > hi);
            }
        }
        // Drain B: everything goes, every port comes back.
        b.expire(u64::MAX, usize::MAX);
        prop_assert_eq!((b.session_count(), b.mapping_count()), (0, 0));
        b.check_invariants().map_err(TestCaseError::fail)?;
    }
}
