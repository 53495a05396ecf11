#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flow_offload::packet::fuzz_parse(data);
});
