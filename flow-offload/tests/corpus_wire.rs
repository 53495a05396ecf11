//! Replays the `wire_frame` fuzz seed corpus (and every prefix of each file) through
//! `fuzz_frames`, so the seeds are exercised by `cargo test` without a fuzzer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use flow_offload::wire::frame::fuzz_frames;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/wire_frame")
}

#[test]
fn corpus_files_and_prefixes_do_not_panic() {
    let dir = corpus_dir();
    let mut files = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect::<Vec<_>>();
    files.sort();
    assert!(
        files.len() >= 8,
        "expected at least 8 seed files in {}, found {}",
        dir.display(),
        files.len()
    );
    for path in &files {
        let data = std::fs::read(path).unwrap();
        for end in 0..=data.len() {
            fuzz_frames(&data[..end]);
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut files = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect::<Vec<_>>();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

proptest::proptest! {
    /// A poor man's fuzzer for `cargo test`: arbitrary bytes.
    #[test]
    fn arbitrary_bytes_do_not_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        fuzz_frames(&data);
    }

    /// Seeds with a few bytes overwritten, concatenated with another seed.
    #[test]
    fn mutated_seeds_do_not_panic(
        a in proptest::prelude::any::<proptest::sample::Index>(),
        b in proptest::prelude::any::<proptest::sample::Index>(),
        edits in proptest::collection::vec(
            (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
            0..4,
        ),
    ) {
        let seeds = seeds();
        let mut data = seeds[a.index(seeds.len())].clone();
        data.extend_from_slice(&seeds[b.index(seeds.len())]);
        for (at, byte) in edits {
            let i = at.index(data.len());
            data[i] = byte;
        }
        fuzz_frames(&data);
    }
}
