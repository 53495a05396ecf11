/* Hand-written shims for DPDK facilities that are macros rather than
 * functions, so bindgen cannot generate callable bindings for them. */
#include "wrapper.h"

/* rte_errno is a per-lcore (thread-local) variable behind a macro. */
int dpdk_sys_errno(void)
{
	return rte_errno;
}

void dpdk_sys_set_errno(int value)
{
	rte_errno = value;
}
