//! End-to-end smoke test of the raw bindings against DPDK's `net_null` PMD.
//!
//! One EAL per process: this file holds exactly one `#[test]`, so the test
//! binary initialises EAL once and cleans it up at the end. It needs no
//! hugepages and no NIC (`--no-huge --no-pci --in-memory`), but EAL wants
//! root (or equivalent capabilities) to set up its memory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};
use std::ptr;

use dpdk_sys as sys;

const PORT_NAME: &str = "net_null0";
const BURST: usize = 32;
const POOL_SIZE: u32 = 1023;
const RING_SIZE: u16 = 256;

/// EAL arguments that work on a machine without hugepages or NICs.
/// `DPDK_SYS_TEST_EAL_ARGS` (whitespace-separated, program name excluded)
/// overrides them, e.g. to add `-d <pmd dir>` on a static DPDK build.
fn eal_args() -> Vec<CString> {
    if let Ok(extra) = std::env::var("DPDK_SYS_TEST_EAL_ARGS") {
        return std::iter::once("dpdk-sys-eal-null")
            .chain(extra.split_whitespace())
            .map(|s| CString::new(s).expect("no NUL in EAL args"))
            .collect();
    }
    [
        "dpdk-sys-eal-null",
        "-l",
        "0",
        "--no-huge",
        "--no-pci",
        "--no-shconf",
        "-m",
        "256",
        "--vdev=net_null0",
        "--log-level=*:error",
    ]
    .iter()
    .map(|s| CString::new(*s).expect("no NUL in EAL args"))
    .collect()
}

fn errno_name(e: c_int) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local
    // NUL-terminated string, valid until the next call on this thread.
    let s = unsafe { CStr::from_ptr(sys::rte_strerror(e)) };
    format!("{} ({e})", s.to_string_lossy())
}

#[test]
fn eal_null_port_burst_and_flow_validate() {
    // --- EAL ---------------------------------------------------------------
    let args = eal_args();
    // rte_eal_init may permute argv, so hand it a private array of pointers;
    // the CStrings in `args` outlive EAL (they live until the end of the test).
    let mut argv: Vec<*mut c_char> = args.iter().map(|a| a.as_ptr() as *mut c_char).collect();
    let argc = c_int::try_from(argv.len()).expect("few args");
    // SAFETY: argv holds argc valid NUL-terminated strings that stay alive for
    // the whole test; this is the only rte_eal_init call in this process.
    let ret = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
    // SAFETY: reading the calling thread's rte_errno is always sound.
    let errno = unsafe { sys::dpdk_sys_errno() };
    assert!(
        ret >= 0,
        "rte_eal_init failed: {ret}, rte_errno {}",
        errno_name(errno)
    );
    println!("rte_eal_init consumed {ret} args");

    // --- port lookup -------------------------------------------------------
    let name = CString::new(PORT_NAME).expect("no NUL");
    let mut port_id: u16 = u16::MAX;
    // SAFETY: `name` is a valid C string and `port_id` a valid out-pointer.
    let ret = unsafe { sys::rte_eth_dev_get_port_by_name(name.as_ptr(), &mut port_id) };
    assert_eq!(ret, 0, "net_null0 not found: is the net_null PMD loaded?");
    // SAFETY: plain query on an initialised EAL.
    let avail_ports = unsafe { sys::rte_eth_dev_count_avail() };
    assert_eq!(avail_ports, 1, "exactly one (null) port expected");
    println!("port {PORT_NAME} has id {port_id}");

    // SAFETY: plain query on an initialised EAL.
    let socket = unsafe { sys::rte_eth_dev_socket_id(port_id) };
    let socket_u = if socket < 0 { 0 } else { socket as u32 };

    // --- mempool -----------------------------------------------------------
    let pool_name = CString::new("dpdk_sys_test_pool").expect("no NUL");
    // SAFETY: valid name; sizes within DPDK limits; EAL initialised.
    let pool = unsafe {
        sys::rte_pktmbuf_pool_create(
            pool_name.as_ptr(),
            POOL_SIZE,
            32,
            0,
            sys::RTE_MBUF_DEFAULT_BUF_SIZE as u16,
            socket,
        )
    };
    // SAFETY: reading the calling thread's rte_errno is always sound.
    let errno = unsafe { sys::dpdk_sys_errno() };
    assert!(
        !pool.is_null(),
        "rte_pktmbuf_pool_create: {}",
        errno_name(errno)
    );
    // SAFETY: `pool` is a valid mempool.
    let avail_initial = unsafe { sys::rte_mempool_avail_count(pool) };
    assert_eq!(avail_initial, POOL_SIZE);

    // --- configure + start -------------------------------------------------
    let conf = sys::rte_eth_conf::default();
    // SAFETY: valid port, zeroed (default) config that outlives the call.
    let ret = unsafe { sys::rte_eth_dev_configure(port_id, 1, 1, &conf) };
    assert_eq!(ret, 0, "rte_eth_dev_configure: {}", errno_name(-ret));
    // SAFETY: valid port/queue, NULL rxconf selects the driver default, pool valid.
    let ret =
        unsafe { sys::rte_eth_rx_queue_setup(port_id, 0, RING_SIZE, socket_u, ptr::null(), pool) };
    assert_eq!(ret, 0, "rte_eth_rx_queue_setup: {}", errno_name(-ret));
    // SAFETY: valid port/queue, NULL txconf selects the driver default.
    let ret = unsafe { sys::rte_eth_tx_queue_setup(port_id, 0, RING_SIZE, socket_u, ptr::null()) };
    assert_eq!(ret, 0, "rte_eth_tx_queue_setup: {}", errno_name(-ret));
    // SAFETY: port configured with its queues set up.
    let ret = unsafe { sys::rte_eth_dev_start(port_id) };
    assert_eq!(ret, 0, "rte_eth_dev_start: {}", errno_name(-ret));

    // --- rx burst: net_null hands out packets -------------------------------
    let mut pkts: [*mut sys::rte_mbuf; BURST] = [ptr::null_mut(); BURST];
    // SAFETY: port started, queue 0 exists, `pkts` has room for BURST pointers;
    // called from lcore 0 (this thread, pinned by rte_eal_init).
    let nb_rx = unsafe { sys::rte_eth_rx_burst(port_id, 0, pkts.as_mut_ptr(), BURST as u16) };
    assert_eq!(
        usize::from(nb_rx),
        BURST,
        "net_null rx should fill the burst"
    );
    for (i, &m) in pkts.iter().enumerate() {
        assert!(!m.is_null(), "rx mbuf {i} is NULL");
        // SAFETY: the PMD returned nb_rx valid mbufs, owned by us until freed/sent.
        let (pkt_len, data_len, mp) = unsafe {
            (
                *dpdk_sys::mbuf::pkt_len(m),
                *dpdk_sys::mbuf::data_len(m),
                (*m).pool,
            )
        };
        assert_eq!(pkt_len, 64, "net_null default packet size");
        assert_eq!(u32::from(data_len), pkt_len);
        assert_eq!(mp, pool, "rx mbufs come from our pool");
    }
    // SAFETY: `pool` is valid.
    let avail_after_rx = unsafe { sys::rte_mempool_avail_count(pool) };
    assert_eq!(avail_after_rx, POOL_SIZE - BURST as u32);

    // --- tx burst: net_null swallows (frees) them ---------------------------
    // SAFETY: the mbufs are ours and valid; on success ownership passes to
    // the PMD, which frees them.
    let nb_tx = unsafe { sys::rte_eth_tx_burst(port_id, 0, pkts.as_mut_ptr(), nb_rx) };
    assert_eq!(nb_tx, nb_rx, "net_null tx accepts the whole burst");

    // --- static-inline wrappers for alloc/free -----------------------------
    // SAFETY: `pool` is a valid pktmbuf pool.
    let m = unsafe { sys::rte_pktmbuf_alloc(pool) };
    assert!(!m.is_null(), "rte_pktmbuf_alloc");
    // SAFETY: freshly allocated mbuf.
    let (pkt_len, refcnt) = unsafe { (*dpdk_sys::mbuf::pkt_len(m), *dpdk_sys::mbuf::refcnt(m)) };
    assert_eq!((pkt_len, refcnt), (0, 1));
    // SAFETY: `m` is ours and not used afterwards.
    unsafe { sys::rte_pktmbuf_free(m) };
    // SAFETY: `pool` is valid.
    let avail_after_tx = unsafe { sys::rte_mempool_avail_count(pool) };
    assert_eq!(avail_after_tx, POOL_SIZE, "every mbuf back in the pool");

    let mut stats = sys::rte_eth_stats::default();
    // SAFETY: valid port and out-pointer.
    let ret = unsafe { sys::rte_eth_stats_get(port_id, &mut stats) };
    assert_eq!(ret, 0);
    println!(
        "stats: ipackets={} opackets={} ibytes={} obytes={}",
        stats.ipackets, stats.opackets, stats.ibytes, stats.obytes
    );
    assert_eq!(stats.ipackets, BURST as u64);
    assert_eq!(stats.opackets, BURST as u64);

    // --- rte_flow: null PMD has no flow ops -> ENOSYS -----------------------
    let mut attr = sys::rte_flow_attr::default();
    attr.set_ingress(1);
    let queue = sys::rte_flow_action_queue { index: 0 };
    let item = |t: sys::rte_flow_item_type| sys::rte_flow_item {
        type_: t,
        spec: ptr::null(),
        last: ptr::null(),
        mask: ptr::null(),
    };
    let pattern = [
        item(sys::RTE_FLOW_ITEM_TYPE_ETH),
        item(sys::RTE_FLOW_ITEM_TYPE_IPV4),
        item(sys::RTE_FLOW_ITEM_TYPE_END),
    ];
    let actions = [
        sys::rte_flow_action {
            type_: sys::RTE_FLOW_ACTION_TYPE_QUEUE,
            conf: (&queue as *const sys::rte_flow_action_queue).cast(),
        },
        sys::rte_flow_action {
            type_: sys::RTE_FLOW_ACTION_TYPE_END,
            conf: ptr::null(),
        },
    ];
    let mut err = sys::rte_flow_error {
        type_: sys::RTE_FLOW_ERROR_TYPE_NONE,
        cause: ptr::null(),
        message: ptr::null(),
    };
    // SAFETY: attr/pattern/actions are valid, END-terminated and outlive the
    // call; `err` is a valid out-pointer.
    let ret = unsafe {
        sys::rte_flow_validate(port_id, &attr, pattern.as_ptr(), actions.as_ptr(), &mut err)
    };
    // SAFETY: reading the calling thread's rte_errno is always sound.
    let errno = unsafe { sys::dpdk_sys_errno() };
    let msg = if err.message.is_null() {
        String::from("<none>")
    } else {
        // SAFETY: DPDK sets `message` to a static NUL-terminated string.
        unsafe { CStr::from_ptr(err.message) }
            .to_string_lossy()
            .into_owned()
    };
    println!(
        "rte_flow_validate -> {ret}, rte_errno {}, error type {}, message {msg:?}",
        errno_name(errno),
        err.type_
    );
    assert_eq!(
        ret,
        -(sys::ENOSYS as c_int),
        "null PMD must refuse rte_flow with -ENOSYS"
    );
    assert_eq!(errno, (sys::ENOSYS as c_int));
    assert_eq!(err.type_, sys::RTE_FLOW_ERROR_TYPE_UNSPECIFIED);

    // --- teardown ----------------------------------------------------------
    // SAFETY: port started above; no other thread uses it.
    let ret = unsafe { sys::rte_eth_dev_stop(port_id) };
    assert_eq!(ret, 0, "rte_eth_dev_stop: {}", errno_name(-ret));
    // SAFETY: port stopped; not used afterwards.
    let ret = unsafe { sys::rte_eth_dev_close(port_id) };
    assert_eq!(ret, 0, "rte_eth_dev_close: {}", errno_name(-ret));
    // SAFETY: the port that referenced the pool is closed and all mbufs are back.
    unsafe { sys::rte_mempool_free(pool) };
    // SAFETY: every DPDK object is released; no DPDK call follows.
    let ret = unsafe { sys::rte_eal_cleanup() };
    assert_eq!(ret, 0, "rte_eal_cleanup");
}
