#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Flashing a DPU image against the cost of hashing it once.
//!
//! `cargo bench -p bench --bench image_flash`
//!
//! - `image_flash/sha256_64MiB`: one SHA-256 pass over a 64 MiB buffer (the floor: a flash must
//!   hash every byte at least twice, once per chunk on arrival, once on read-back).
//! - `image_flash/flash_tcp_64MiB_tmpfs`: a full flash of a 64 MiB image, 1 MiB chunks, from a
//!   `ChunkServer` over loopback TCP with 4 `TcpChunkSource` streams into a file slot on tmpfs
//!   (`/dev/shm`): fetch, per-chunk verify, write, journal, read-back verify. Server and client
//!   share the machine's cores.
//! - `image_flash/flash_tcp_64MiB_disk`: the same into a slot in the default temp dir (a real
//!   disk here): adds the `fdatasync`s of the journal checkpoints, so it measures the disk too.
//! - `image_flash/cpu` (printed): process CPU time of one SHA-256 pass and of one flash (server
//!   and client together, tmpfs slot), and their ratio: the flash's floor on this machine's
//!   cores, independent of how loaded the machine is.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use images::boot::{BootState, SlotId};
use images::flash::{fetch_manifest, flash, ChunkServer, FlashOptions, TcpChunkSource};
use images::format::{build_image, verify_manifest, BuildParams, Image, Sha256Digest};
use images::keys::{keygen, read_signing_key, TrustedKeys, PUBLIC_FILE, SECRET_FILE};
use images::slot::{Slot, SlotSet, SlotWriter};

const SIZE: usize = 64 << 20;
const CHUNK: u32 = 1 << 20;

/// A scratch directory removed on drop (the bench crate has no tempfile).
struct Scratch(PathBuf);

impl Scratch {
    fn new(base: &Path, tag: &str) -> Self {
        let p = base.join(format!("dpucp-image-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn payload() -> Vec<u8> {
    // Incompressible-looking bytes (xorshift), so nothing benefits from zero pages.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let data = payload();
    let keys = Scratch::new(&std::env::temp_dir(), "keys");
    keygen(&keys.0).unwrap();
    let key = read_signing_key(&keys.0.join(SECRET_FILE)).unwrap();
    let trust = TrustedKeys::load(&keys.0.join(PUBLIC_FILE)).unwrap();
    let params = BuildParams {
        target: "bluefield-3".into(),
        agent_version: "bench".into(),
        chunk_size: CHUNK,
        created_unix: 0,
    };
    let image = Arc::new(Image::parse(build_image(&data, &params, &key).unwrap()).unwrap());
    let server = ChunkServer::start("127.0.0.1:0".parse().unwrap(), image.clone()).unwrap();
    let addr = server.local_addr();
    let (mb, sig) = fetch_manifest(addr, &image.id()).unwrap();
    let vm = verify_manifest(&mb, &sig, &trust, Some("bluefield-3")).unwrap();

    let mut g = c.benchmark_group("image_flash");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("sha256_64MiB", |b| {
        b.iter(|| black_box(Sha256Digest::of(black_box(&data))))
    });
    let mut targets = vec![("disk", std::env::temp_dir())];
    if Path::new("/dev/shm").is_dir() {
        targets.insert(0, ("tmpfs", PathBuf::from("/dev/shm")));
    }
    for (tag, base) in targets {
        let dir = Scratch::new(&base, tag);
        let slots = SlotSet {
            a: Slot::file(dir.0.join("a"), SIZE as u64),
            b: Slot::file(dir.0.join("b"), SIZE as u64),
            state_dir: dir.0.clone(),
        };
        let boot = BootState::new(SlotId::A);
        let opts = FlashOptions {
            parallel: 4,
            max_attempts: 3,
        };
        let source = TcpChunkSource::new(addr, &vm);
        g.bench_function(format!("flash_tcp_64MiB_{tag}"), |b| {
            b.iter(|| {
                let w = SlotWriter::open(&slots, &boot, SlotId::B, vm.clone()).unwrap();
                let r = flash(&source, w, &opts, &|_| {}).unwrap();
                assert_eq!(r.written, 64);
            })
        });
    }
    g.finish();
    // CPU cost beside wall time: what the flash costs in SHA-256 passes, whatever the load.
    let cpu = || {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let f: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
        let t = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        (t(11) + t(12)) as f64 / 100.0 // utime + stime in 100 Hz ticks
    };
    let n = 20;
    let c0 = cpu();
    for _ in 0..n {
        black_box(Sha256Digest::of(black_box(&data)));
    }
    let sha_cpu = (cpu() - c0) / f64::from(n);
    let shm = Scratch::new(Path::new("/dev/shm"), "cpu");
    let slots = SlotSet {
        a: Slot::file(shm.0.join("a"), SIZE as u64),
        b: Slot::file(shm.0.join("b"), SIZE as u64),
        state_dir: shm.0.clone(),
    };
    let source = TcpChunkSource::new(addr, &vm);
    let c0 = cpu();
    for _ in 0..n {
        let w =
            SlotWriter::open(&slots, &BootState::new(SlotId::A), SlotId::B, vm.clone()).unwrap();
        flash(
            &source,
            w,
            &FlashOptions {
                parallel: 4,
                max_attempts: 3,
            },
            &|_| {},
        )
        .unwrap();
    }
    let flash_cpu = (cpu() - c0) / f64::from(n);
    println!(
        "image_flash/cpu: sha256 {:.1} ms, flash (server + client) {:.1} ms = {:.2} SHA-256 passes",
        sha_cpu * 1e3,
        flash_cpu * 1e3,
        flash_cpu / sha_cpu
    );
    server.stop();
}

criterion_group!(benches, bench);
criterion_main!(benches);
