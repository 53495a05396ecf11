//! Fuzzes the pair's sync input path: frames or raw postcard messages, the receiver and sender
//! state machines, NAT session import.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flow_offload::ha::fuzz::fuzz_sync(data);
});
