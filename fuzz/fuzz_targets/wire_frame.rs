//! Fuzzes host↔DPU frame reassembly and message decoding.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flow_offload::wire::frame::fuzz_frames(data);
});
