/* Headers exposed through dpdk-sys. rte_config.h comes from pkg-config's
 * `-include rte_config.h`, but including it here too keeps bindgen and cc
 * independent of flag ordering. */
#include <rte_config.h>
#include <rte_errno.h>
#include <rte_eal.h>
#include <rte_lcore.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_flow.h>
#include <rte_mtr.h>
#include <rte_lpm.h>
#include <rte_fib.h>
#include <rte_ring.h>
/* Ring-backed ethdev ports (net_ring PMD) and the vdev bus to remove them. */
#include <rte_eth_ring.h>
#include <rte_bus_vdev.h>

/* Shims for things bindgen cannot reach (macros / TLS variables). */
int dpdk_sys_errno(void);
void dpdk_sys_set_errno(int value);
