//! Ring-backed ports (`net_ring` through `rte_eth_from_ring`) and bulk mbuf allocation on a
//! real EAL (needs root, no hugepages, no NIC). One EAL per process: a single `#[test]`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use dpdk::{Eal, Mempool, Port, PortConfig, PortError, RingPort, RingPortError};

const EAL_ARGS: &[&str] = &[
    "dpdk-ring-port",
    "-l",
    "0",
    "--no-huge",
    "--no-pci",
    "--no-shconf",
    "-m",
    "256",
    "--vdev=net_null0",
    "--log-level=*:error",
];

#[test]
fn ring_port_delivers_injected_frames() {
    let eal = Eal::init(EAL_ARGS).expect("EAL init");
    let pool = Mempool::pktmbuf(&eal, "ring_pool", 1023, 0, Mempool::DEFAULT_DATA_ROOM, None)
        .expect("mempool");
    let null_id = Port::id_by_name(&eal, "net_null0").expect("net_null0");

    // Bulk allocation: all or nothing.
    let mut pkts = Vec::new();
    assert!(!pool.alloc_bulk(&mut pkts, dpdk::MAX_BURST + 1));
    assert!(pkts.is_empty());
    assert!(pool.alloc_bulk(&mut pkts, 32));
    assert_eq!(pkts.len(), 32);
    assert_eq!(pool.available(), 1023 - 32);
    for (i, m) in pkts.iter_mut().enumerate() {
        assert_eq!(m.pkt_len(), 0, "fresh mbufs are empty");
        m.append(60).expect("tailroom").fill(i as u8);
    }

    {
        let ring = RingPort::new(&eal, "bench_ring", RingPort::DEFAULT_SIZE).expect("ring port");
        assert_ne!(ring.id(), null_id);
        assert_eq!(
            Port::id_by_name(&eal, "net_ring_bench_ring").expect("named net_ring_<name>"),
            ring.id()
        );
        assert!(matches!(
            RingPort::new(&eal, "bench_ring", RingPort::DEFAULT_SIZE),
            Err(RingPortError::Ring(_))
        ));
        let mut port = ring
            .configure(&pool, PortConfig::default())
            .expect("configure");
        assert!(matches!(
            Port::configure(ring.id(), &pool, PortConfig::default()),
            Err(PortError::AlreadyClaimed(_))
        ));
        port.start().expect("start");

        // Injected frames arrive in order, byte for byte.
        assert_eq!(ring.inject(&mut pkts), 32);
        assert!(pkts.is_empty());
        assert_eq!(ring.queued(), 32);
        let mut rx = Vec::new();
        assert_eq!(port.rx_burst(&mut rx, 64), 32);
        assert_eq!(ring.queued(), 0);
        for (i, m) in rx.iter().enumerate() {
            assert_eq!(m.data(), &[i as u8; 60][..], "frame {i}");
        }

        // Tx on the port loops back into the ring.
        assert_eq!(port.tx_burst(&mut rx), 32);
        assert!(rx.is_empty());
        assert_eq!(port.rx_burst(&mut rx, 16), 16);
        assert_eq!(port.rx_burst(&mut rx, 64), 16);
        assert_eq!(rx[31].data(), &[31u8; 60][..]);
        let stats = port.stats().expect("stats");
        assert_eq!((stats.ipackets, stats.opackets), (64, 32));
        drop(rx);
        assert_eq!(pool.available(), 1023, "every mbuf back in the pool");
        // Drop order enforced by borrows: port, then ring (vdev removed, ring freed).
        drop(port);
    }

    // The vdev and the ring are gone: the same name can be created again.
    let again = RingPort::new(&eal, "bench_ring", 64).expect("name free again after drop");
    let mut one = Vec::new();
    assert!(pool.alloc_bulk(&mut one, 1));
    assert_eq!(again.inject(&mut one), 1);
    let mut port = again
        .configure(&pool, PortConfig::default())
        .expect("configure");
    port.start().expect("start");
    let mut rx = Vec::new();
    assert_eq!(port.rx_burst(&mut rx, 8), 1);
    drop(rx);
    drop(port);
    drop(again);
    // Never configured: the drop alone removes the port and the ring.
    let ports = eal.port_count();
    drop(RingPort::new(&eal, "unused", 64).expect("ring port"));
    assert_eq!(eal.port_count(), ports);
    drop(RingPort::new(&eal, "unused", 64).expect("name free again"));
    assert!(matches!(
        RingPort::new(&eal, "bad\0name", 64),
        Err(RingPortError::BadName)
    ));
    assert!(matches!(
        RingPort::new(&eal, "not_pow2", 1000),
        Err(RingPortError::Ring(_))
    ));
    drop((pkts, one));
    assert_eq!(pool.available(), 1023);
    drop(pool);
    drop(eal);
}
