//! Runs the packet fuzz target over its seed corpus and every truncation of each seed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::Path;

use flow_offload::packet::fuzz_parse;

#[test]
fn seed_corpus_and_all_prefixes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/packet_parse");
    let mut files = 0;
    for entry in fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("directory entry").path();
        if !path.is_file() {
            continue;
        }
        let data = fs::read(&path).expect("seed file");
        for n in 0..=data.len() {
            fuzz_parse(&data[..n]);
        }
        files += 1;
    }
    assert!(files >= 10, "only {files} seeds in {}", dir.display());
}
