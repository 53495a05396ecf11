//! Replays the `fpm_stream` fuzz seed corpus (and every prefix of each file) through
//! `fuzz_stream`, so the seeds run under `cargo test` without a fuzzer; plus arbitrary and
//! mutated bytes through proptest.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use host_agent::fpm::fuzz::fuzz_stream;

/// The seeds, read once (a fuzzer running beside the tests adds and removes files).
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/fpm_stream");
        let mut files = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|p| p.is_file())
            .collect::<Vec<_>>();
        files.sort();
        files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
    })
}

#[test]
fn corpus_files_and_prefixes_do_not_panic() {
    let seeds = seeds();
    assert!(
        seeds.len() >= 8,
        "expected at least 8 seeds, found {}",
        seeds.len()
    );
    for data in seeds {
        for end in 0..=data.len() {
            fuzz_stream(&data[..end]);
        }
    }
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_do_not_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        fuzz_stream(&data);
    }

    /// A seed with a few bytes overwritten, followed by another seed.
    #[test]
    fn mutated_seeds_do_not_panic(
        a in proptest::prelude::any::<proptest::sample::Index>(),
        b in proptest::prelude::any::<proptest::sample::Index>(),
        edits in proptest::collection::vec(
            (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
            0..6,
        ),
    ) {
        let seeds = seeds();
        let mut data = a.get(seeds).clone();
        for (at, byte) in &edits {
            if !data.is_empty() {
                let i = at.index(data.len());
                data[i] = *byte;
            }
        }
        let tail: &Vec<u8> = b.get(seeds);
        data.extend_from_slice(tail);
        fuzz_stream(&data);
    }
}
