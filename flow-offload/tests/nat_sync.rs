//! NAT state sync for a redundancy group: disjoint allocation blocks, session export/import
//! between two tables (an active and a standby), the record's wire encoding, and the
//! pipeline's pass-throughs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr};

use flow_offload::model::{
    Change, Ipv4Range, MacAddr, Model, Name, NatKind, NatRule, Node, PortId, TableId, Vni, Vpc,
};
use flow_offload::soft::nat::{
    AllocBlock, ExportCursor, ImportError, LifetimeClass, NatConfig, NatConfigError, NatError,
    NatSyncError, NatTable, Proto, Random, SessionId, SessionRecord, TcpState, Timeouts,
    XorShift32, TCP_ACK, TCP_FIN, TCP_SYN,
};
use flow_offload::soft::{Pipeline, PipelineLimits};
use proptest::prelude::*;

const S: u64 = 1_000_000_000;
const POOL: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 51, 100, 1),
    Ipv4Addr::new(198, 51, 100, 2),
    Ipv4Addr::new(198, 51, 100, 3),
    Ipv4Addr::new(198, 51, 100, 4),
];
const POOL64: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);

fn config(pool: &[Ipv4Addr], ports: (u16, u16), cap: usize, block: AllocBlock) -> NatConfig {
    NatConfig {
        max_mappings: cap,
        max_sessions: cap,
        pool: pool.to_vec(),
        port_range: ports,
        timeouts: Timeouts::default(),
        block,
    }
}

fn table<I: Copy + Eq + Hash + Debug>(cfg: NatConfig, seed: u32) -> NatTable<I> {
    NatTable::new(cfg, &mut XorShift32(seed)).unwrap()
}

fn below(rng: &mut XorShift32, n: u32) -> u32 {
    ((u64::from(rng.next_u32()) * u64::from(n)) >> 32) as u32
}

fn v4_host(h: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 | h)
}

fn v6_host(h: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (h >> 16) as u16, h as u16)
}

fn remote(rng: &mut XorShift32) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(203, 0, 113, below(rng, 254) as u8 + 1),
        below(rng, 60000) as u16 + 1,
    )
}

/// One flow opened on a table, and what the table answered.
#[derive(Debug, Clone, Copy)]
struct Flow<I> {
    proto: Proto,
    inside: (I, u16),
    remote: (Ipv4Addr, u16),
    outside: (Ipv4Addr, u16),
    id: SessionId,
}

/// Opens `n` random flows on `t` from `hosts` inside hosts (TCP, UDP and ICMP; about half of
/// the TCP ones answered, some of those half-closed; about half the UDP ones answered),
/// starting at `now`; returns the flows that were created.
fn open_flows<I: Copy + Eq + Hash + Debug>(
    t: &mut NatTable<I>,
    rng: &mut XorShift32,
    host: impl Fn(u32) -> I,
    hosts: u32,
    n: usize,
    now: u64,
) -> Vec<Flow<I>> {
    let mut flows = Vec::new();
    for _ in 0..n {
        let proto = Proto::ALL[below(rng, 3) as usize];
        let inside = (host(below(rng, hosts)), below(rng, 60000) as u16 + 1024);
        let r = remote(rng);
        let r = if proto == Proto::Icmp { (r.0, 0) } else { r };
        let syn = if proto == Proto::Tcp { TCP_SYN } else { 0 };
        let Ok(o) = t.outbound(proto, inside, r, syn, now, rng) else {
            continue;
        };
        match (proto, below(rng, 4)) {
            (Proto::Tcp, 0) => {}
            (Proto::Tcp, 1) => {
                t.inbound(proto, r, o.outside, TCP_SYN | TCP_ACK, now + S)
                    .unwrap();
                t.outbound(proto, inside, r, TCP_FIN | TCP_ACK, now + 2 * S, rng)
                    .unwrap();
            }
            (Proto::Tcp, _) => {
                t.inbound(proto, r, o.outside, TCP_SYN | TCP_ACK, now + S)
                    .unwrap();
            }
            (_, 0 | 1) => {
                t.inbound(proto, r, o.outside, 0, now + S).unwrap();
            }
            _ => {}
        }
        flows.push(Flow {
            proto,
            inside,
            remote: r,
            outside: o.outside,
            id: o.session,
        });
    }
    // Flows that hit an existing session: keep the latest view of each session only.
    let mut seen = HashSet::new();
    flows.retain(|f| seen.insert(f.id));
    flows
}

fn in_block(port: u16, block: (u16, u16)) -> bool {
    port >= block.0 && port <= block.1
}

// --- allocation blocks ------------------------------------------------------------------------

fn bindings<I: Copy + Eq + Hash + Debug>(t: &NatTable<I>) -> HashSet<(Ipv4Addr, u16, Proto)> {
    t.sessions()
        .map(|v| (v.outside.0, v.outside.1, v.proto))
        .collect()
}

/// Two members of a pair over the same pool, the same hosts and the same number of flows (as
/// in a split brain where both are active): with blocks 0/2 and 1/2 they never hand out the
/// same outside endpoint; without blocks they do (so the test has teeth).
#[test]
fn disjoint_blocks_never_share_a_binding() {
    let ports = (1024, 1535);
    let run = |ba: AllocBlock, bb: AllocBlock| {
        let mut a: NatTable<Ipv4Addr> = table(config(&POOL[..2], ports, 4096, ba), 1);
        let mut b: NatTable<Ipv4Addr> = table(config(&POOL[..2], ports, 4096, bb), 2);
        let mut ra = XorShift32(77);
        let mut rb = XorShift32(78);
        open_flows(&mut a, &mut ra, v4_host, 64, 3000, 0);
        open_flows(&mut b, &mut rb, v4_host, 64, 3000, 0);
        (a, b)
    };
    let (a, b) = run(AllocBlock::new(0, 2), AllocBlock::new(1, 2));
    let (ka, kb) = (bindings(&a), bindings(&b));
    assert!(
        ka.len() > 1000 && kb.len() > 1000,
        "{} {}",
        ka.len(),
        kb.len()
    );
    assert_eq!(
        ka.intersection(&kb).count(),
        0,
        "the two blocks shared a binding"
    );
    assert!(ka.iter().all(|k| in_block(k.1, (1024, 1279))));
    assert!(kb.iter().all(|k| in_block(k.1, (1280, 1535))));
    // The same flows without blocks collide.
    let (a, b) = run(AllocBlock::WHOLE, AllocBlock::WHOLE);
    assert!(bindings(&a).intersection(&bindings(&b)).count() > 100);
}

#[test]
fn exhausting_a_block_reports_ports_exhausted() {
    let cfg = |b| config(&POOL[..1], (2000, 2009), 64, b);
    let mut a: NatTable<Ipv4Addr> = table(cfg(AllocBlock::new(0, 2)), 5);
    let mut rng = XorShift32(9);
    let r = (Ipv4Addr::new(203, 0, 113, 1), 80);
    let mut got = BTreeSet::new();
    for p in 0..5 {
        let o = a
            .outbound(Proto::Udp, (v4_host(1), p), r, 0, 0, &mut rng)
            .unwrap();
        got.insert(o.outside.1);
    }
    assert_eq!(got, (2000..=2004).collect());
    // Ports 2005..=2009 are free, but they are the other member's.
    assert_eq!(
        a.outbound(Proto::Udp, (v4_host(1), 99), r, 0, 0, &mut rng),
        Err(NatError::PortsExhausted { addr: POOL[0] })
    );
    assert_eq!(a.stats().port_exhausted, 1);
    // Other protocols have their own ports; the other member has its five.
    a.outbound(Proto::Tcp, (v4_host(1), 99), r, TCP_SYN, 0, &mut rng)
        .unwrap();
    let mut b: NatTable<Ipv4Addr> = table(cfg(AllocBlock::new(1, 2)), 6);
    let mut got = BTreeSet::new();
    for p in 0..5 {
        got.insert(
            b.outbound(Proto::Udp, (v4_host(1), p), r, 0, 0, &mut rng)
                .unwrap()
                .outside
                .1,
        );
    }
    assert_eq!(got, (2005..=2009).collect());
    assert!(b
        .outbound(Proto::Udp, (v4_host(2), 1), r, 0, 0, &mut rng)
        .is_err());
}

#[test]
fn block_configuration_is_validated() {
    let mut rng = XorShift32(1);
    let bad = |block, ports| {
        NatTable::<Ipv4Addr>::new(config(&POOL[..1], ports, 8, block), &mut XorShift32(1)).err()
    };
    assert_eq!(
        bad(AllocBlock::new(0, 0), (1024, 2047)),
        Some(NatError::Config(NatConfigError::BadBlock {
            index: 0,
            count: 0
        }))
    );
    assert_eq!(
        bad(AllocBlock::new(3, 3), (1024, 2047)),
        Some(NatError::Config(NatConfigError::BadBlock {
            index: 3,
            count: 3
        }))
    );
    assert_eq!(
        bad(AllocBlock::new(0, 4), (1024, 1026)),
        Some(NatError::Config(NatConfigError::EmptyBlock {
            index: 0,
            count: 4,
            ports: 3
        }))
    );
    assert_eq!(AllocBlock::default(), AllocBlock::WHOLE);
    assert!(NatTable::<Ipv4Addr>::new(
        config(&POOL[..1], (7, 9), 8, AllocBlock::new(2, 3)),
        &mut rng
    )
    .is_ok());
}

// --- export and import ------------------------------------------------------------------------

/// Exports every session of `a` with bulk steps of `budget` slots.
fn export_all<I: Copy + Eq + Hash + Debug>(
    a: &NatTable<I>,
    budget: usize,
    now: u64,
) -> Vec<SessionRecord<I>> {
    let mut out = Vec::new();
    let mut cursor = ExportCursor::START;
    let mut calls = 0;
    while let Some(next) = a.export_batch(cursor, budget, now, &mut out) {
        cursor = next;
        calls += 1;
        assert!(
            calls <= a.config().max_sessions,
            "the export does not progress"
        );
    }
    out
}

/// The whole failover: A serves thousands of flows, B imports A's snapshot (on another clock),
/// then every flow's next packets, both ways, get exactly A's answers from B; strangers are
/// still refused; B's new flows come from B's block and never from an imported binding.
fn failover<I: Copy + Eq + Hash + Debug>(host: impl Fn(u32) -> I + Copy) {
    let ports = (1024, 65535);
    let block_a = AllocBlock::new(0, 2);
    let block_b = AllocBlock::new(1, 2);
    let mut a: NatTable<I> = table(config(&POOL, ports, 16384, block_a), 11);
    let mut rng = XorShift32(12345);
    let t0 = 1_000 * S;
    let flows = open_flows(&mut a, &mut rng, host, 300, 6000, t0);
    assert!(flows.len() > 5000);
    let ta = t0 + 10 * S;
    let records = export_all(&a, 97, ta);
    assert_eq!(records.len(), a.session_count());
    assert_eq!(
        records.iter().copied().collect::<HashSet<_>>(),
        a.sessions_export(ta).collect::<HashSet<_>>()
    );
    let a_block = block_a.ports(ports).unwrap();
    assert!(records.iter().all(|r| in_block(r.outside.1, a_block)));

    // B's clock is unrelated to A's.
    let tb = 90_000 * S;
    let mut b: NatTable<I> = table(config(&POOL, ports, 16384, block_b), 22);
    let mut ids = HashMap::new();
    for r in &records {
        let id = b.import(r, tb).unwrap();
        ids.insert((r.proto, r.inside, r.remote), id);
    }
    assert_eq!(b.session_count(), a.session_count());
    assert_eq!(b.mapping_count(), a.mapping_count());
    assert_eq!(b.stats().imported, records.len() as u64);
    assert_eq!(b.stats().created, 0);

    // Same state, same remaining lifetime (on B's clock).
    for f in &flows {
        let va = a.session(f.id).unwrap();
        let vb = b.session(ids[&(f.proto, f.inside, f.remote)]).unwrap();
        assert_eq!(
            (vb.proto, vb.inside, vb.outside, vb.remote, vb.tcp_state),
            (va.proto, va.inside, va.outside, va.remote, va.tcp_state)
        );
        assert_eq!(vb.expires_at_ns - tb, va.expires_at_ns - ta);
        assert_eq!(
            vb.established_since_ns.map(|t| tb - t),
            va.established_since_ns.map(|t| ta - t)
        );
    }

    // Idempotent: importing the snapshot again changes nothing.
    for r in &records {
        assert_eq!(b.import(r, tb), Ok(ids[&(r.proto, r.inside, r.remote)]));
    }
    assert_eq!(b.session_count(), records.len());
    assert_eq!(b.stats().imported, records.len() as u64);

    // The flows' next packets, through B.
    let now = tb + S;
    for f in &flows {
        let flags = if f.proto == Proto::Tcp { TCP_ACK } else { 0 };
        let o = b
            .outbound(f.proto, f.inside, f.remote, flags, now, &mut rng)
            .unwrap();
        assert_eq!(o.outside, f.outside, "{f:?}");
        assert_eq!(o.session, ids[&(f.proto, f.inside, f.remote)]);
        let i = b.inbound(f.proto, f.remote, f.outside, flags, now).unwrap();
        assert_eq!((i.inside, i.session), (f.inside, o.session));
        // Filtering is still exact: another remote, or another remote port, is refused.
        assert_eq!(
            b.inbound(f.proto, (STRANGER, f.remote.1), f.outside, flags, now),
            None
        );
        if f.proto != Proto::Icmp {
            assert_eq!(
                b.inbound(f.proto, (f.remote.0, f.remote.1 ^ 1), f.outside, flags, now),
                None
            );
        }
    }
    assert_eq!(b.session_count(), records.len(), "no session was created");
    assert_eq!(b.stats().created, 0);

    // New flows on B, from the same hosts and from new ones: B's block only, no collision.
    let b_block = block_b.ports(ports).unwrap();
    let fresh = open_flows(&mut b, &mut rng, host, 600, 4000, now);
    assert!(fresh.len() > 3000);
    let mut taken: HashMap<(Proto, (Ipv4Addr, u16)), (I, u16)> = HashMap::new();
    let mut imported = HashMap::new();
    for r in &records {
        taken.insert((r.proto, r.outside), r.inside);
        imported.insert((r.proto, r.inside), r.outside);
    }
    for f in &fresh {
        if imported.get(&(f.proto, f.inside)) == Some(&f.outside) {
            // An imported mapping, used by a new remote (endpoint-independent mapping).
            continue;
        }
        assert!(in_block(f.outside.1, b_block), "{f:?}");
        let prev = taken.insert((f.proto, f.outside), f.inside);
        assert!(
            prev.is_none() || prev == Some(f.inside),
            "{f:?} took a binding of {prev:?}"
        );
    }
    // Every binding in B has exactly one owner.
    for v in b.sessions() {
        assert_eq!(b.binding(v.proto, v.outside), Some(v.inside));
    }
}

#[test]
fn failover_napt44() {
    failover(v4_host);
}

#[test]
fn failover_nat64() {
    failover(v6_host);
}

/// A small pair for the targeted tests: A serves, B is fresh; one address so that pairing
/// never gets in the way.
fn pair() -> (NatTable<Ipv4Addr>, NatTable<Ipv4Addr>, XorShift32) {
    let a = table(
        config(&POOL[..1], (1024, 1279), 64, AllocBlock::new(0, 2)),
        1,
    );
    let b = table(
        config(&POOL[..1], (1024, 1279), 64, AllocBlock::new(1, 2)),
        2,
    );
    (a, b, XorShift32(3))
}

const H1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const H2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const R1: (Ipv4Addr, u16) = (Ipv4Addr::new(203, 0, 113, 1), 443);
const R2: (Ipv4Addr, u16) = (Ipv4Addr::new(203, 0, 113, 2), 443);

#[test]
fn conflicts_are_typed_errors_and_change_nothing() {
    let (mut a, mut b, mut rng) = pair();
    let o = a
        .outbound(Proto::Udp, (H1, 5000), R1, 0, 0, &mut rng)
        .unwrap();
    let rec = a.export(o.session, 0).unwrap();
    b.import(&rec, 0).unwrap();
    let before = (b.session_count(), b.mapping_count(), b.stats());
    let other_port = if rec.outside.1 == 1024 { 1025 } else { 1024 };

    // The inside endpoint is mapped elsewhere here (same flow, or another remote).
    let moved = SessionRecord {
        outside: (rec.outside.0, other_port),
        ..rec
    };
    let want = ImportError::MappingConflict {
        proto: Proto::Udp,
        existing: rec.outside,
        record: moved.outside,
    };
    assert_eq!(b.import(&moved, S), Err(want.clone()));
    assert_eq!(
        b.import(
            &SessionRecord {
                remote: R2,
                ..moved
            },
            S
        ),
        Err(want)
    );
    // The outside endpoint belongs to another inside endpoint here.
    let stolen = SessionRecord {
        inside: (H2, 7),
        ..rec
    };
    assert_eq!(
        b.import(&stolen, S),
        Err(ImportError::OutsideInUse {
            proto: Proto::Udp,
            outside: rec.outside
        })
    );
    // Validation against the table.
    let cases = [
        (
            SessionRecord {
                outside: (Ipv4Addr::new(1, 2, 3, 4), 1024),
                ..rec
            },
            ImportError::NotInPool {
                addr: Ipv4Addr::new(1, 2, 3, 4),
            },
        ),
        (
            SessionRecord {
                outside: (rec.outside.0, 1280),
                ..rec
            },
            ImportError::PortOutOfRange {
                port: 1280,
                lo: 1024,
                hi: 1279,
            },
        ),
        (
            SessionRecord {
                tcp_state: Some(TcpState::Established),
                ..rec
            },
            ImportError::Inconsistent("the TCP state does not fit the protocol"),
        ),
        (
            SessionRecord {
                proto: Proto::Tcp,
                ..rec
            },
            ImportError::Inconsistent("the TCP state does not fit the protocol"),
        ),
        (
            SessionRecord {
                lifetime: LifetimeClass::Icmp,
                ..rec
            },
            ImportError::Inconsistent("the lifetime class does not fit the protocol and TCP state"),
        ),
        (
            SessionRecord {
                proto: Proto::Icmp,
                lifetime: LifetimeClass::Icmp,
                ..rec
            },
            ImportError::Inconsistent("an ICMP session with a remote port"),
        ),
    ];
    for (r, e) in cases {
        assert_eq!(b.import(&r, S), Err(e));
    }
    assert_eq!((b.session_count(), b.mapping_count(), b.stats()), before);
    assert_eq!(b.binding(Proto::Udp, rec.outside), Some((H1, 5000)));
}

/// Members whose pools differ in order pair hosts differently: the record is refused rather
/// than breaking pairing here.
#[test]
fn pools_that_pair_differently_are_refused() {
    let mut a: NatTable<Ipv4Addr> =
        table(config(&POOL, (1024, 65535), 1024, AllocBlock::new(0, 2)), 1);
    let mut reversed = POOL;
    reversed.reverse();
    let mut c: NatTable<Ipv4Addr> = table(
        config(&reversed, (1024, 65535), 1024, AllocBlock::new(1, 2)),
        2,
    );
    let mut rng = XorShift32(5);
    let (mut ok, mut refused) = (0, 0);
    for h in 0..100 {
        let o = a
            .outbound(Proto::Udp, (v4_host(h), 1), R1, 0, 0, &mut rng)
            .unwrap();
        match c.import(&a.export(o.session, 0).unwrap(), 0) {
            Ok(_) => ok += 1,
            Err(ImportError::NotPaired { outside, paired }) => {
                assert_eq!(outside, o.outside.0);
                assert_ne!(paired, outside);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(ok > 0 && refused > 0, "{ok} {refused}");
    // The same pool in the same order pairs every host alike, whatever the seeds.
    let mut b: NatTable<Ipv4Addr> =
        table(config(&POOL, (1024, 65535), 1024, AllocBlock::new(1, 2)), 3);
    for r in a.sessions_export(0).collect::<Vec<_>>() {
        b.import(&r, 0).unwrap();
    }
    for h in 0..100 {
        let o = b
            .outbound(Proto::Tcp, (v4_host(h), 2), R1, TCP_SYN, 0, &mut rng)
            .unwrap();
        assert_eq!(
            Some(o.outside.0),
            a.mapping(Proto::Udp, (v4_host(h), 1)).map(|m| m.0)
        );
    }
}

#[test]
fn expired_records_are_refused() {
    let (mut a, mut b, mut rng) = pair();
    let o = a
        .outbound(Proto::Udp, (H1, 5000), R1, 0, 0, &mut rng)
        .unwrap();
    let udp = Timeouts::default().udp_ns;
    assert_eq!(a.export(o.session, udp), None, "dead at its deadline");
    let rec = a.export(o.session, udp - 1).unwrap();
    assert_eq!(rec.idle_ns, udp - 1);
    assert_eq!(rec.remaining_ns(&Timeouts::default()), 1);
    let tb = 1000 * S;
    assert_eq!(
        b.import(
            &SessionRecord {
                idle_ns: udp,
                ..rec
            },
            tb
        ),
        Err(ImportError::Expired)
    );
    assert_eq!(b.session_count(), 0);
    // One nanosecond left: imported, and dead one nanosecond later.
    let id = b.import(&rec, tb).unwrap();
    assert_eq!(b.session(id).unwrap().expires_at_ns, tb + 1);
    assert_eq!(b.inbound(Proto::Udp, R1, rec.outside, 0, tb + 1), None);
    assert_eq!(b.session_count(), 0, "found dead and removed");
}

/// The peer reuses a port (or re-maps an inside endpoint) as soon as its own copy expired;
/// the dead copy here, not swept yet, gives way.
#[test]
fn dead_bindings_give_way() {
    let (mut a, mut b, mut rng) = pair();
    let o = a
        .outbound(Proto::Udp, (H1, 5000), R1, 0, 0, &mut rng)
        .unwrap();
    b.import(&a.export(o.session, 0).unwrap(), 0).unwrap();
    let udp = Timeouts::default().udp_ns;
    // The outside endpoint, now bound to H2 by the peer.
    let reused = SessionRecord {
        inside: (H2, 9),
        ..a.export(o.session, 0).unwrap()
    };
    assert!(matches!(
        b.import(&reused, udp - 1),
        Err(ImportError::OutsideInUse { .. })
    ));
    b.import(&reused, udp).unwrap();
    assert_eq!(b.binding(Proto::Udp, reused.outside), Some((H2, 9)));
    assert_eq!(b.stats().expired, 1);
    // The inside endpoint re-mapped by the peer to another port.
    let other = if reused.outside.1 == 1024 { 1025 } else { 1024 };
    let remapped = SessionRecord {
        outside: (reused.outside.0, other),
        ..reused
    };
    assert!(matches!(
        b.import(&remapped, udp + S),
        Err(ImportError::MappingConflict { .. })
    ));
    b.import(&remapped, 2 * udp).unwrap();
    assert_eq!(b.mapping(Proto::Udp, (H2, 9)), Some(remapped.outside));
    assert_eq!(b.binding(Proto::Udp, reused.outside), None);
    assert_eq!((b.session_count(), b.mapping_count()), (1, 1));
}

#[test]
fn newest_last_packet_wins() {
    let (mut a, mut b, mut rng) = pair();
    let o = a
        .outbound(Proto::Tcp, (H1, 40000), R1, TCP_SYN, 0, &mut rng)
        .unwrap();
    let opening = a.export(o.session, S).unwrap();
    a.inbound(Proto::Tcp, R1, o.outside, TCP_SYN | TCP_ACK, 2 * S)
        .unwrap();
    let established = a.export(o.session, 2 * S).unwrap();
    assert_eq!(opening.tcp_state, Some(TcpState::Opening));
    assert_eq!(opening.lifetime, LifetimeClass::TcpTransitory);
    assert_eq!((opening.idle_ns, opening.established_for_ns), (S, None));
    assert_eq!(established.tcp_state, Some(TcpState::Established));
    assert_eq!(established.lifetime, LifetimeClass::TcpEstablished);
    assert_eq!(
        (established.idle_ns, established.established_for_ns),
        (0, Some(0))
    );

    // Same clock on both sides here. The newer record arrives at once, the older one (sent at
    // 1 s) half a second later: its last packet (at 0.5 s as seen from B) is older, it
    // changes nothing.
    let id = b.import(&established, 2 * S).unwrap();
    assert_eq!(b.import(&opening, 2 * S + S / 2), Ok(id));
    let v = b.session(id).unwrap();
    assert_eq!(v.tcp_state, Some(TcpState::Established));
    assert_eq!(v.last_seen_ns, 2 * S);
    assert_eq!(b.stats().imported, 1);
    // In order, the newer one wins.
    let (mut a2, mut c, mut rng) = pair();
    let o = a2
        .outbound(Proto::Tcp, (H1, 40000), R1, TCP_SYN, 0, &mut rng)
        .unwrap();
    let id = c.import(&a2.export(o.session, S).unwrap(), S).unwrap();
    a2.inbound(Proto::Tcp, R1, o.outside, TCP_SYN | TCP_ACK, 2 * S)
        .unwrap();
    assert_eq!(
        c.import(&a2.export(o.session, 3 * S).unwrap(), 3 * S),
        Ok(id)
    );
    let v = c.session(id).unwrap();
    assert_eq!(v.tcp_state, Some(TcpState::Established));
    assert_eq!(v.established_since_ns, Some(2 * S));
    assert!(v.is_offload_candidate(3 * S, S));
}

#[test]
fn remove_session_applies_a_delete() {
    let (mut a, mut b, mut rng) = pair();
    let o1 = a
        .outbound(Proto::Udp, (H1, 5000), R1, 0, 0, &mut rng)
        .unwrap();
    let o2 = a
        .outbound(Proto::Udp, (H1, 5000), R2, 0, 0, &mut rng)
        .unwrap();
    for r in a.sessions_export(0).collect::<Vec<_>>() {
        b.import(&r, 0).unwrap();
    }
    let v = b.remove_session(Proto::Udp, (H1, 5000), R1).unwrap();
    assert_eq!((v.remote, v.outside), (R1, o1.outside));
    assert_eq!(b.remove_session(Proto::Udp, (H1, 5000), R1), None);
    // The mapping lives on with its other session, then goes with it.
    assert_eq!(b.binding(Proto::Udp, o2.outside), Some((H1, 5000)));
    assert_eq!(b.inbound(Proto::Udp, R1, o1.outside, 0, S), None);
    b.remove_session(Proto::Udp, (H1, 5000), R2).unwrap();
    assert_eq!(b.binding(Proto::Udp, o2.outside), None);
    assert_eq!((b.session_count(), b.mapping_count()), (0, 0));
    let s = b.stats();
    assert_eq!((s.removed, s.expired), (2, 0));
}

/// A bulk export spread over many calls, with sessions created and removed in between, yields
/// every session that lives through it exactly once.
#[test]
fn bulk_export_survives_churn() {
    let mut a: NatTable<Ipv4Addr> = table(config(&POOL, (1024, 65535), 4096, AllocBlock::WHOLE), 1);
    let mut rng = XorShift32(8);
    let flows = open_flows(&mut a, &mut rng, v4_host, 100, 2000, 0);
    let (keep, churn) = flows.split_at(flows.len() / 2);
    let mut churn = churn.to_vec();
    let mut out = Vec::new();
    let mut cursor = ExportCursor::START;
    let mut h = 10_000;
    while let Some(next) = a.export_batch(cursor, 13, 5 * S, &mut out) {
        cursor = next;
        // Remove a few sessions and open a few new ones.
        for f in churn.drain(..churn.len().min(3)) {
            a.remove_session(f.proto, f.inside, f.remote).unwrap();
        }
        for _ in 0..3 {
            h += 1;
            a.outbound(Proto::Udp, (v4_host(h), 1), R1, 0, 5 * S, &mut rng)
                .unwrap();
        }
    }
    let mut count = HashMap::new();
    for r in &out {
        *count.entry((r.proto, r.inside, r.remote)).or_insert(0) += 1;
    }
    assert!(
        count.values().all(|&c| c == 1),
        "a session was exported twice"
    );
    for f in keep {
        assert_eq!(count.get(&(f.proto, f.inside, f.remote)), Some(&1), "{f:?}");
    }
    // Budget 0 makes no progress and exports nothing.
    let mut none = Vec::new();
    assert_eq!(
        a.export_batch(ExportCursor::START, 0, 5 * S, &mut none),
        Some(ExportCursor::START)
    );
    assert!(none.is_empty());
}

/// A full table: import reclaims dead sessions like an outbound packet, else refuses.
#[test]
fn import_into_a_full_table() {
    let mut a: NatTable<Ipv4Addr> = table(
        config(&POOL[..1], (1024, 1279), 8, AllocBlock::new(0, 2)),
        1,
    );
    let mut b: NatTable<Ipv4Addr> = table(
        config(&POOL[..1], (1024, 1279), 2, AllocBlock::new(1, 2)),
        2,
    );
    let mut rng = XorShift32(4);
    for p in 0..3 {
        a.outbound(Proto::Udp, (H1, p), R1, 0, 0, &mut rng).unwrap();
    }
    let recs: Vec<_> = a.sessions_export(0).collect();
    b.import(&recs[0], 0).unwrap();
    b.import(&recs[1], 0).unwrap();
    assert_eq!(
        b.import(&recs[2], 0),
        Err(ImportError::SessionTableFull { capacity: 2 })
    );
    // Once the first two are dead, the third takes a slot.
    let udp = Timeouts::default().udp_ns;
    let late = SessionRecord {
        idle_ns: 0,
        ..recs[2]
    };
    b.import(&late, udp).unwrap();
    assert_eq!(b.session_count(), 1);
}

// --- the record on the wire -------------------------------------------------------------------

#[test]
fn record_golden_bytes() {
    let rec = SessionRecord {
        proto: Proto::Tcp,
        inside: (Ipv4Addr::new(10, 0, 0, 1), 40000),
        outside: (Ipv4Addr::new(198, 51, 100, 1), 1024),
        remote: (Ipv4Addr::new(203, 0, 113, 1), 443),
        tcp_state: Some(TcpState::Established),
        lifetime: LifetimeClass::TcpEstablished,
        idle_ns: S,
        established_for_ns: Some(5 * S),
    };
    #[rustfmt::skip]
    let want: Vec<u8> = vec![
        0x00,                               // proto: Tcp
        10, 0, 0, 1, 0xC0, 0xB8, 0x02,      // inside: 4 address bytes, port 40000 (varint)
        198, 51, 100, 1, 0x80, 0x08,        // outside: port 1024
        203, 0, 113, 1, 0xBB, 0x03,         // remote: port 443
        0x01, 0x01,                         // tcp_state: Some(Established)
        0x00,                               // lifetime: TcpEstablished
        0x80, 0x94, 0xEB, 0xDC, 0x03,       // idle_ns: 1e9 (varint)
        0x01, 0x80, 0xE4, 0x97, 0xD0, 0x12, // established_for_ns: Some(5e9)
    ];
    let bytes = postcard::to_allocvec(&rec).unwrap();
    assert_eq!(bytes, want);
    assert_eq!(
        postcard::from_bytes::<SessionRecord<Ipv4Addr>>(&bytes).unwrap(),
        rec
    );
    // NAT64: the inside address is 16 bytes, the rest the same.
    let rec6 = SessionRecord {
        proto: Proto::Udp,
        inside: (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 53),
        outside: (Ipv4Addr::new(198, 51, 100, 1), 1024),
        remote: (Ipv4Addr::new(203, 0, 113, 1), 53),
        tcp_state: None,
        lifetime: LifetimeClass::Udp,
        idle_ns: 0,
        established_for_ns: None,
    };
    let mut want6 = vec![0x01, 0x20, 0x01, 0x0d, 0xb8];
    want6.extend_from_slice(&[0; 11]);
    want6.extend_from_slice(&[
        0x01, 0x35, 198, 51, 100, 1, 0x80, 0x08, 203, 0, 113, 1, 0x35,
    ]);
    want6.extend_from_slice(&[0x00, 0x02, 0x00, 0x00]);
    assert_eq!(postcard::to_allocvec(&rec6).unwrap(), want6);
}

fn proto() -> impl Strategy<Value = Proto> {
    prop_oneof![Just(Proto::Tcp), Just(Proto::Udp), Just(Proto::Icmp)]
}

fn tcp_state() -> impl Strategy<Value = Option<TcpState>> {
    prop_oneof![
        Just(None),
        Just(Some(TcpState::Opening)),
        Just(Some(TcpState::Established)),
        Just(Some(TcpState::FinOutbound)),
        Just(Some(TcpState::FinInbound)),
        Just(Some(TcpState::Closing)),
        Just(Some(TcpState::Reset)),
    ]
}

fn class() -> impl Strategy<Value = LifetimeClass> {
    prop_oneof![
        Just(LifetimeClass::TcpEstablished),
        Just(LifetimeClass::TcpTransitory),
        Just(LifetimeClass::Udp),
        Just(LifetimeClass::Icmp),
    ]
}

fn v4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

proptest! {
    #[test]
    fn records_round_trip_through_postcard(
        p in proto(), a in v4(), a6 in any::<u128>(), o in v4(), r in v4(),
        ports in any::<(u16, u16, u16)>(), st in tcp_state(), c in class(),
        idle in any::<u64>(), est in any::<Option<u64>>(),
    ) {
        let rec = SessionRecord {
            proto: p,
            inside: (a, ports.0),
            outside: (o, ports.1),
            remote: (r, ports.2),
            tcp_state: st,
            lifetime: c,
            idle_ns: idle,
            established_for_ns: est,
        };
        let bytes = postcard::to_allocvec(&rec).unwrap();
        prop_assert_eq!(postcard::from_bytes::<SessionRecord<Ipv4Addr>>(&bytes).unwrap(), rec);
        let rec6 = SessionRecord {
            proto: rec.proto,
            inside: (Ipv6Addr::from(a6), ports.0),
            outside: rec.outside,
            remote: rec.remote,
            tcp_state: rec.tcp_state,
            lifetime: rec.lifetime,
            idle_ns: rec.idle_ns,
            established_for_ns: rec.established_for_ns,
        };
        let bytes6 = postcard::to_allocvec(&rec6).unwrap();
        prop_assert_eq!(bytes6.len(), bytes.len() + 12);
        prop_assert_eq!(postcard::from_bytes::<SessionRecord<Ipv6Addr>>(&bytes6).unwrap(), rec6);
    }

    /// Whatever A did, its export imports into an empty B and exports back unchanged (with B
    /// exporting at the same offset from its import time).
    #[test]
    fn export_import_export_is_the_identity(seed in any::<u32>(), n in 1usize..300, dt in 0u64..400) {
        let mut a: NatTable<Ipv4Addr> = table(config(&POOL, (1024, 4095), 512, AllocBlock::new(0, 3)), seed);
        let mut rng = XorShift32(seed ^ 0x5555);
        open_flows(&mut a, &mut rng, v4_host, 20, n, 0);
        let now = 3 * S + dt * S;
        let recs: HashSet<_> = a.sessions_export(now).collect();
        let mut b: NatTable<Ipv4Addr> = table(config(&POOL, (1024, 4095), 512, AllocBlock::new(2, 3)), !seed);
        let tb = 1000 * S;
        for r in &recs {
            b.import(r, tb).unwrap();
        }
        let back: HashSet<_> = b.sessions_export(tb).collect();
        prop_assert_eq!(recs, back);
    }
}

// --- the pipeline's pass-throughs -------------------------------------------------------------

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn pipeline(seed: u64) -> Pipeline {
    let mut m = Model::new();
    m.apply(&[
        Change::SetNode(Node {
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            router_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            uplinks: BTreeSet::from([PortId(0)]),
        }),
        Change::UpsertVpc(Vpc {
            name: name("blue"),
            vni: Vni::new(100).unwrap(),
            table: TableId(10),
            ports: BTreeSet::from([PortId(1)]),
        }),
        Change::UpsertNat(NatRule {
            name: name("out"),
            vpc: name("blue"),
            kind: NatKind::Napt44 {
                pool: Ipv4Range {
                    first: POOL[0],
                    last: POOL[3],
                },
                ports: (1024, 2047),
            },
        }),
        Change::UpsertNat(NatRule {
            name: name("six"),
            vpc: name("blue"),
            kind: NatKind::Nat64 {
                prefix: "64:ff9b::/96".parse().unwrap(),
                pool: Ipv4Range::single(POOL64),
                ports: (1024, 65535),
            },
        }),
    ])
    .unwrap();
    Pipeline::new(&m, PipelineLimits::default(), seed).unwrap()
}

#[test]
fn pipeline_pass_throughs() {
    let (out, six, nope) = (name("out"), name("six"), name("nope"));
    let mut pa = pipeline(1);
    let mut pb = pipeline(2);
    assert_eq!(pa.nat64_rules().collect::<Vec<_>>(), vec![&six]);
    // A standalone table with the rule's pool stands in for the active's traffic (pairing is
    // keyed by the pool, so it pairs like the pipelines' tables).
    let cfg = config(&POOL, (1024, 2047), 64, AllocBlock::WHOLE);
    let mut a: NatTable<Ipv4Addr> = table(cfg.clone(), 9);
    let mut rng = XorShift32(1);
    for h in 0..20 {
        a.outbound(Proto::Udp, (v4_host(h), 1), R1, 0, 0, &mut rng)
            .unwrap();
    }
    for r in a.sessions_export(S).collect::<Vec<_>>() {
        let id = pa.napt_import(&out, &r, S).unwrap();
        assert_eq!(pa.session(&out, id).unwrap().outside, r.outside);
        assert_eq!(pa.napt_export(&out, id, S), Some(r));
    }
    // From pipeline A to pipeline B, in bulk.
    let mut recs = Vec::new();
    let mut cursor = ExportCursor::START;
    while let Some(next) = pa
        .napt_export_batch(&out, cursor, 100, 2 * S, &mut recs)
        .unwrap()
    {
        cursor = next;
    }
    assert_eq!(recs.len(), 20);
    for r in &recs {
        pb.napt_import(&out, r, 2 * S).unwrap();
    }
    let r = recs[0];
    assert!(pb
        .napt_remove_session(&out, r.proto, r.inside, r.remote)
        .is_some());
    assert!(pb
        .napt_remove_session(&nope, r.proto, r.inside, r.remote)
        .is_none());
    assert_eq!(pb.napt_import(&nope, &r, 0), Err(NatSyncError::UnknownRule));
    assert_eq!(
        pb.napt_export_batch(&six, ExportCursor::START, 1, 0, &mut Vec::new()),
        Err(NatSyncError::UnknownRule),
        "NAT64 rules are not NAPT44 rules"
    );
    assert!(matches!(
        pb.napt_import(
            &out,
            &SessionRecord {
                outside: (POOL[0], 5000),
                ..r
            },
            0
        ),
        Err(NatSyncError::Import(ImportError::PortOutOfRange { .. }))
    ));

    // NAT64.
    let mut a6: NatTable<Ipv6Addr> =
        table(config(&[POOL64], (1024, 65535), 64, AllocBlock::WHOLE), 9);
    let o = a6
        .outbound(Proto::Tcp, (v6_host(1), 40000), R1, TCP_SYN, 0, &mut rng)
        .unwrap();
    let rec = a6.export(o.session, 0).unwrap();
    pb.nat64_import(&six, &rec, 0).unwrap();
    let mut got = Vec::new();
    assert_eq!(
        pb.nat64_export_batch(&six, ExportCursor::START, usize::MAX, 0, &mut got),
        Ok(None)
    );
    assert_eq!(got, vec![rec]);
    assert_eq!(
        pb.nat64_import(&out, &rec, 0),
        Err(NatSyncError::UnknownRule)
    );
    assert!(pb
        .nat64_remove_session(&six, Proto::Tcp, rec.inside, rec.remote)
        .is_some());
    let mut got = Vec::new();
    pb.nat64_export_batch(&six, ExportCursor::START, usize::MAX, 0, &mut got)
        .unwrap();
    assert!(got.is_empty());
}
