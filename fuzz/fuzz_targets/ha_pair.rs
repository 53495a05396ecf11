//! Fuzzes the pair connection's decoder as the DPU agent runs it: frames of hellos, standby
//! reports and the replication stream of NAT sessions, into a receiver and a sender.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flow_offload::ha::fuzz::fuzz_pair(data);
});
