//! Runs the real `dpu-image` binary: keygen, build, inspect, verify, and its errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dpu-image"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = run(&["keygen", "--out", s(&dir.path().join("keys"))]);
        assert!(out.status.success(), "{out:?}");
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
        std::fs::write(dir.path().join("rootfs.tar"), payload).unwrap();
        let out = run(&[
            "build",
            "--payload",
            s(&dir.path().join("rootfs.tar")),
            "--target",
            "bluefield-3",
            "--agent-version",
            "0.1.0",
            "--chunk-size",
            "16K",
            "--key",
            s(&dir.path().join("keys/image-signing.key")),
            "--out",
            s(&dir.path().join("img")),
            "--created",
            "1700000000",
        ]);
        assert!(out.status.success(), "{out:?}");
        Self { dir }
    }
    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn keygen_build_inspect_verify() {
    let t = Setup::new();
    let mode = std::fs::metadata(t.p("keys/image-signing.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = run(&["inspect", &t.p("img")]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("bluefield-3"), "{text}");
    assert!(text.contains("chunks         7"), "{text}");
    let out = run(&["inspect", &t.p("img"), "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["manifest"]["payload_size"], 100_000);
    assert_eq!(v["manifest"]["chunk_size"], 16384);
    assert_eq!(v["manifest"]["created_unix"], 1_700_000_000u64);
    assert_eq!(v["manifest"]["chunk_sha256"].as_array().unwrap().len(), 7);
    let out = run(&[
        "verify",
        &t.p("img"),
        "--trust",
        &t.p("keys"),
        "--target",
        "bluefield-3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("OK "));
    // Trust given as the public key file itself.
    let out = run(&[
        "verify",
        &t.p("img"),
        "--trust",
        &t.p("keys/image-signing.pub"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn verify_failures_exit_3_with_reason() {
    let t = Setup::new();
    // Another key pair is not trusted.
    assert!(run(&["keygen", "--out", &t.p("other")]).status.success());
    let out = run(&["verify", &t.p("img"), "--trust", &t.p("other")]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("not trusted"), "{}", stderr(&out));
    // Wrong target.
    let out = run(&[
        "verify",
        &t.p("img"),
        "--trust",
        &t.p("keys"),
        "--target",
        "bluefield-2",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("bluefield-2"), "{}", stderr(&out));
    // One payload byte flipped.
    let mut bytes = std::fs::read(t.p("img")).unwrap();
    let n = bytes.len();
    bytes[n - 50_000] ^= 1;
    std::fs::write(t.p("flipped"), &bytes).unwrap();
    let out = run(&["verify", &t.p("flipped"), "--trust", &t.p("keys")]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("chunk 3"), "{}", stderr(&out));
    // Signature byte flipped (the first signature byte sits 64 + payload bytes from the end).
    let mut bytes = std::fs::read(t.p("img")).unwrap();
    bytes[n - 100_000 - 64] ^= 1;
    std::fs::write(t.p("badsig"), &bytes).unwrap();
    let out = run(&["verify", &t.p("badsig"), "--trust", &t.p("keys")]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("bad signature"), "{}", stderr(&out));
}

#[test]
fn malformed_inputs_exit_1_with_reason() {
    let t = Setup::new();
    let bytes = std::fs::read(t.p("img")).unwrap();
    std::fs::write(t.p("short"), &bytes[..bytes.len() - 1]).unwrap();
    let out = run(&["inspect", &t.p("short")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("truncated payload"),
        "{}",
        stderr(&out)
    );
    let out = run(&["verify", &t.p("short"), "--trust", &t.p("keys")]);
    assert_eq!(out.status.code(), Some(1));
    std::fs::write(t.p("junk"), b"not an image at all").unwrap();
    let out = run(&["inspect", &t.p("junk")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bad magic"), "{}", stderr(&out));
    let out = run(&["inspect", &t.p("missing")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing"), "{}", stderr(&out));
    // Keys: refusing to overwrite, unreadable secret key, empty trust directory.
    let out = run(&["keygen", "--out", &t.p("keys")]);
    assert_eq!(out.status.code(), Some(1));
    std::fs::write(t.p("bad.key"), b"zz").unwrap();
    let out = run(&[
        "build",
        "--payload",
        &t.p("rootfs.tar"),
        "--target",
        "x",
        "--agent-version",
        "1",
        "--key",
        &t.p("bad.key"),
        "--out",
        &t.p("never"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a key file"), "{}", stderr(&out));
    assert!(!t.dir.path().join("never").exists());
    std::fs::create_dir(t.p("empty")).unwrap();
    let out = run(&["verify", &t.p("img"), "--trust", &t.p("empty")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no public keys"), "{}", stderr(&out));
    // Usage errors come from clap with exit code 2.
    let out = run(&[
        "build",
        "--payload",
        &t.p("rootfs.tar"),
        "--target",
        "x",
        "--agent-version",
        "1",
        "--chunk-size",
        "lots",
        "--key",
        &t.p("keys/image-signing.key"),
        "--out",
        &t.p("never"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&[
        "build",
        "--payload",
        &t.p("rootfs.tar"),
        "--target",
        "x",
        "--agent-version",
        "1",
        "--chunk-size",
        "0",
        "--key",
        &t.p("keys/image-signing.key"),
        "--out",
        &t.p("never"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("chunk size 0"), "{}", stderr(&out));
}
