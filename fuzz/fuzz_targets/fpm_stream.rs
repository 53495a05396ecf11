//! Fuzzes the FPM input path: frame reassembly, netlink decoding, the RIB.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    host_agent::fpm::fuzz::fuzz_stream(data);
});
