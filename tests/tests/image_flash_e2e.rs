//! Image flashing end to end, every process real: etcd, the `host-agent` daemon, two `dpu-agent`s
//! (DPDK `net_null` ports, reference NIC, `[image]` file slots), `dpu-image` to make keys and
//! images, and `dpuctl image flash` to drive it.
//!
//! - `--all --activate`: both DPUs fetch from one chunk server, verify, write slot B, restart
//!   into it and commit; `dpuctl dpus` shows B active and the image id.
//! - An image whose payload fails the DPUs' health check: two trial boots, then rolled back;
//!   the previous slot stays active and untouched.
//! - Refused before anything is written: a key nobody trusts (by the host), a key the host
//!   trusts but the DPUs do not (by the DPU), a wrong target (by the DPU), a truncated file (by
//!   the host), a second flash of a DPU that is flashing.
//! - kill -9 of a DPU agent mid-flash: the host reports the link lost; after a restart the same
//!   flash resumes from the journal and completes.
//!
//! Needs root (EAL) and etcd; run by `scripts/test` after the binaries are built.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{bin, eventually, free_port, is_root, text, Proc};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn run_ok(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{cmd:?}\n{}", text(&o));
    o
}

const TARGET: &str = "test-dpu";
static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

struct World {
    dir: PathBuf,
    api: String,
    etcd: Proc,
    host: Proc,
    dpus: BTreeMap<String, (Proc, PathBuf)>,
}

impl World {
    fn dpu_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn slot(&self, id: &str, s: &str) -> PathBuf {
        self.dpu_dir(id).join(format!("slot-{s}"))
    }

    fn start_dpu(dir: &Path, id: &str, port: u16) -> (Proc, PathBuf) {
        let d = dir.join(id);
        std::fs::create_dir_all(&d).unwrap();
        // Healthy unless the slot's payload starts with "BAD!".
        let health =
            r#"["sh", "-c", "test \"$(head -c 4 \"$DPUCP_SLOT_PATH\" 2>/dev/null)\" != BAD!"]"#;
        let cfg = format!(
            "dpu_id = \"{id}\"\n[eal]\nargs = [\"-l\", \"0\", \"--no-huge\", \"--no-pci\", \"--no-shconf\", \"-m\", \"128\", \"--file-prefix=imgt-{id}\", \"--log-level=*:warning\"]\n\
             [[ports]]\nname = \"net_null0\"\ndevice = \"net_null0,no-rx=1\"\nrole = \"uplink\"\n\
             [[ports]]\nname = \"net_null1\"\ndevice = \"net_null1,no-rx=1\"\nrole = \"vpc\"\n\
             [lcores]\nforwarding = 0\n[link]\nlisten = \"127.0.0.1:{port}\"\n[nic]\nbackend = \"reference\"\n\
             [image]\nslot_a = \"{a}\"\nslot_b = \"{b}\"\nslot_capacity = 268435456\nstate_dir = \"{st}\"\n\
             trusted_keys = [\"{keys}\"]\ntarget = \"{TARGET}\"\nhealth_command = {health}\ncheckpoint_bytes = 1048576\n",
            a = d.join("slot-A").display(),
            b = d.join("slot-B").display(),
            st = d.join("state").display(),
            keys = dir.join("k1/image-signing.pub").display(),
        );
        let cfg_path = d.join("agent.toml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let p = Proc::spawn(
            Command::new(bin("dpu-agent"))
                .arg("--config")
                .arg(&cfg_path)
                .env("RUST_LOG", "info"),
            d.join(format!(
                "agent-{}.log",
                STARTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            )),
        );
        (p, cfg_path)
    }

    fn start() -> World {
        let dir = std::env::temp_dir().join(format!("dpucp-image-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for k in ["k1", "k2", "k3"] {
            run_ok(
                Command::new(bin("dpu-image"))
                    .args(["keygen", "--out"])
                    .arg(dir.join(k)),
            );
        }
        // The host trusts k1 and k2; the DPUs only k1.
        std::fs::create_dir_all(dir.join("host-keys")).unwrap();
        for k in ["k1", "k2"] {
            std::fs::copy(
                dir.join(k).join("image-signing.pub"),
                dir.join("host-keys").join(format!("{k}.pub")),
            )
            .unwrap();
        }
        let (client, peer) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let etcd = Proc::spawn(
            Command::new(std::env::var("ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".into()))
                .args(["--name", "t", "--data-dir"])
                .arg(dir.join("etcd"))
                .args([
                    "--listen-client-urls",
                    &etcd_url,
                    "--advertise-client-urls",
                    &etcd_url,
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &format!("t=http://127.0.0.1:{peer}"),
                    "--log-level",
                    "warn",
                ]),
            dir.join("etcd.log"),
        );
        let mut dpus = BTreeMap::new();
        let mut links = String::new();
        for id in ["d1", "d2"] {
            let port = free_port();
            dpus.insert(id.to_owned(), Self::start_dpu(&dir, id, port));
            links.push_str(&format!(
                "[[dpus]]\nid = \"{id}\"\nlink = \"127.0.0.1:{port}\"\n"
            ));
        }
        let api_port = free_port();
        let cfg = format!(
            "[etcd]\nendpoints = [\"{etcd_url}\"]\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n{links}[images]\nlisten = \"127.0.0.1:0\"\ntrusted_keys = [\"{}\"]\n",
            free_port(),
            dir.join("host-keys").display()
        );
        std::fs::write(dir.join("host-agent.toml"), cfg).unwrap();
        let host = Proc::spawn(
            Command::new(bin("host-agent"))
                .arg("--config")
                .arg(dir.join("host-agent.toml"))
                .env("RUST_LOG", "info"),
            dir.join("host-agent.log"),
        );
        World {
            api: format!("http://127.0.0.1:{api_port}"),
            dir,
            etcd,
            host,
            dpus,
        }
    }

    fn logs(&self) -> String {
        let mut s = format!("--- host-agent\n{}\n", self.host.log());
        for (id, (p, _)) in &self.dpus {
            s.push_str(&format!("--- {id}\n{}\n", p.log()));
            // Logs of earlier processes of this DPU (restarts).
            if let Ok(rd) = std::fs::read_dir(self.dpu_dir(id)) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().to_string();
                    if n.starts_with("agent-") && e.path() != p.log {
                        s.push_str(&format!(
                            "--- {id} {n}\n{}\n",
                            std::fs::read_to_string(e.path()).unwrap_or_default()
                        ));
                    }
                }
            }
        }
        s.push_str(&format!("--- etcd\n{}\n", self.etcd.log()));
        s
    }

    fn dpuctl(&self, args: &[&str]) -> Output {
        Command::new(bin("dpuctl"))
            .args(["--server", &self.api])
            .args(args)
            .output()
            .unwrap()
    }

    fn dpus(&self) -> Vec<Value> {
        let o = self.dpuctl(&["--json", "dpus"]);
        if !o.status.success() {
            return Vec::new();
        }
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    }

    fn dpu(&self, id: &str) -> Value {
        self.dpus()
            .into_iter()
            .find(|d| d["id"] == id)
            .unwrap_or(Value::Null)
    }

    /// Builds an image of `payload` signed with key `key` for `target`.
    fn image(&self, name: &str, payload: &[u8], key: &str, target: &str, chunk: &str) -> PathBuf {
        let p = self.dir.join(format!("{name}.payload"));
        std::fs::write(&p, payload).unwrap();
        let out = self.dir.join(format!("{name}.img"));
        run_ok(
            Command::new(bin("dpu-image"))
                .args(["build", "--payload"])
                .arg(&p)
                .args([
                    "--target",
                    target,
                    "--agent-version",
                    "9.9",
                    "--chunk-size",
                    chunk,
                ])
                .arg("--key")
                .arg(self.dir.join(key).join("image-signing.key"))
                .arg("--out")
                .arg(&out),
        );
        out
    }

    /// `dpuctl --json image flash ARGS`: exit code and the JSON events.
    fn flash(&self, args: &[&str]) -> (Option<i32>, Vec<Value>, String) {
        let o = self.dpuctl(&[&["--json", "image", "flash"], args].concat());
        let events = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (o.status.code(), events, text(&o))
    }

    fn restart_dpu(&mut self, id: &str) {
        let cfg = self.dpus[id].1.clone();
        let port: u16 = std::fs::read_to_string(&cfg)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("listen = \"127.0.0.1:"))
            .and_then(|r| r.trim_end_matches('"').parse().ok())
            .unwrap();
        let fresh = Self::start_dpu(&self.dir, id, port);
        self.dpus.insert(id.to_owned(), fresh);
    }
}

fn payload(prefix: &[u8], len: usize, seed: u32) -> Vec<u8> {
    let mut v = prefix.to_vec();
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn phases<'a>(events: &'a [Value], dpu: &str) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for e in events.iter().filter(|e| e["dpu_id"] == dpu) {
        let p = e["phase"].as_str().unwrap_or("");
        if out.last() != Some(&p) {
            out.push(p);
        }
    }
    out
}

fn last_of<'a>(events: &'a [Value], dpu: &str) -> &'a Value {
    events
        .iter()
        .rev()
        .find(|e| e["dpu_id"] == dpu)
        .unwrap_or(&Value::Null)
}

fn file_bytes(p: &Path) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

#[test]
fn image_flash_through_the_agents() {
    if !is_root() {
        eprintln!("skipped: needs root (EAL)");
        return;
    }
    let mut w = World::start();
    eventually(
        "both DPUs report their boot state (slot A)",
        Duration::from_secs(60),
        || {
            let d = w.dpus();
            d.len() == 2 && d.iter().all(|x| x["active_slot"] == "A")
        },
        || w.logs(),
    );

    // 1. Both DPUs, one chunk server, restart into B, commit.
    let good = payload(b"GOOD", 6 << 20, 1);
    let img = w.image("good", &good, "k1", TARGET, "256K");
    let (code, ev, out) = w.flash(&[
        "--all",
        "--parallel",
        "2",
        "--activate",
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}\n{}", w.logs());
    let mut servers = std::collections::BTreeSet::new();
    let mut image_ids = std::collections::BTreeSet::new();
    for d in ["d1", "d2"] {
        let p = phases(&ev, d);
        assert_eq!(
            p,
            [
                "queued",
                "started",
                "progress",
                "flashed",
                "rebooting",
                "committed"
            ],
            "{d}: {out}"
        );
        let flashed = ev
            .iter()
            .find(|e| e["dpu_id"] == d && e["phase"] == "flashed")
            .unwrap();
        assert_eq!(flashed["slot"], "B");
        assert_eq!(flashed["fetches"], 24, "6 MiB in 256 KiB chunks: {flashed}");
        for e in ev.iter().filter(|e| e["dpu_id"] == d) {
            servers.insert(e["chunk_server"].as_str().unwrap().to_owned());
            image_ids.insert(e["image_id"].as_str().unwrap().to_owned());
        }
        let slot_b = file_bytes(&w.slot(d, "B")).unwrap();
        assert_eq!(
            &slot_b[..good.len()],
            &good[..],
            "{d}: slot B holds the payload"
        );
    }
    assert_eq!(
        servers.len(),
        1,
        "one chunk server for both DPUs: {servers:?}"
    );
    assert_eq!(image_ids.len(), 1);
    let image_id = image_ids.into_iter().next().unwrap();
    eventually(
        "dpuctl dpus shows both on B, committed",
        Duration::from_secs(30),
        || {
            ["d1", "d2"].iter().all(|d| {
                let x = w.dpu(d);
                x["running_slot"] == "B"
                    && x["active_slot"] == "B"
                    && x["pending_slot"] == ""
                    && x["last_boot"] == "committed B"
                    && x["slot_images"]["B"] == image_id.as_str()
            })
        },
        || format!("{:?}\n{}", w.dpus(), w.logs()),
    );
    assert_eq!(
        w.host.log().matches("flash requested").count(),
        1,
        "the image was read once for both DPUs"
    );

    // 2. An image the health check rejects: two trial boots of A, then back to B.
    let b_before = file_bytes(&w.slot("d1", "B")).unwrap();
    let bad = payload(b"BAD!", 2 << 20, 2);
    let img_bad = w.image("bad", &bad, "k1", TARGET, "256K");
    let (code, ev, out) = w.flash(&[
        "--dpu",
        "d1",
        "--tries",
        "2",
        "--activate",
        img_bad.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "a rollback is a failed flash: {out}");
    assert_eq!(
        phases(&ev, "d1"),
        [
            "queued",
            "started",
            "progress",
            "flashed",
            "rebooting",
            "rolled_back"
        ],
        "{out}\n{}",
        w.logs()
    );
    let last = last_of(&ev, "d1");
    assert_eq!(last["slot"], "B", "running B again: {last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("rolled back A -> B: health command"),
        "{last}"
    );
    let d1 = w.dpu("d1");
    assert_eq!(d1["active_slot"], "B", "{d1}");
    assert_eq!(d1["running_slot"], "B", "{d1}");
    assert_eq!(d1["pending_slot"], "", "{d1}");
    assert_eq!(
        file_bytes(&w.slot("d1", "B")).unwrap(),
        b_before,
        "the active slot is untouched"
    );
    let trial_boots = w.dpus["d1"]
        .0
        .log()
        .matches("starting on the slot on trial")
        .count();
    assert_eq!(
        trial_boots,
        3,
        "one trial boot of B, two of A:\n{}",
        w.logs()
    );

    // 3. Refusals; nothing is written.
    let a_before = file_bytes(&w.slot("d2", "A"));
    let b_before = file_bytes(&w.slot("d2", "B")).unwrap();
    let untouched = |w: &World, what: &str| {
        assert_eq!(file_bytes(&w.slot("d2", "A")), a_before, "{what}: slot A");
        assert_eq!(
            file_bytes(&w.slot("d2", "B")).unwrap(),
            b_before,
            "{what}: slot B"
        );
    };
    // Signed by a key nobody trusts: the host refuses.
    let img = w.image("k3", &payload(b"GOOD", 1 << 20, 3), "k3", TARGET, "256K");
    let (code, ev, out) = w.flash(&["--dpu", "d2", img.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(ev.is_empty(), "{out}");
    assert!(
        out.contains("InvalidArgument") && out.contains("image_path"),
        "{out}"
    );
    untouched(&w, "unknown key");
    // Signed by a key the host trusts and the DPU does not: the DPU refuses.
    let img = w.image("k2", &payload(b"GOOD", 1 << 20, 4), "k2", TARGET, "256K");
    let (code, ev, out) = w.flash(&["--dpu", "d2", img.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    let last = last_of(&ev, "d2");
    assert_eq!(last["phase"], "failed", "{out}");
    assert_eq!(last["failure"], "refused", "{out}");
    assert!(last["message"].as_str().unwrap().contains("key"), "{last}");
    untouched(&w, "key the DPU does not trust");
    // Another DPU model.
    let img = w.image(
        "other",
        &payload(b"GOOD", 1 << 20, 5),
        "k1",
        "other-dpu",
        "256K",
    );
    let (code, ev, out) = w.flash(&["--dpu", "d2", img.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    let last = last_of(&ev, "d2");
    assert_eq!(last["failure"], "refused", "{out}");
    assert!(
        last["message"].as_str().unwrap().contains("other-dpu"),
        "{last}"
    );
    untouched(&w, "wrong target");
    // A truncated file.
    let whole = std::fs::read(w.dir.join("good.img")).unwrap();
    let cut = w.dir.join("cut.img");
    std::fs::write(&cut, &whole[..whole.len() - 1000]).unwrap();
    let (code, ev, out) = w.flash(&["--dpu", "d2", cut.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(ev.is_empty() && out.contains("image_path"), "{out}");
    untouched(&w, "truncated image");
    // An unknown DPU.
    let (code, _, out) = w.flash(&["--dpu", "d9", img.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("NotFound") && out.contains("d9"), "{out}");

    // 4. A second flash of a DPU that is flashing is refused; then kill -9 of that DPU agent
    //    mid-flash, restart, and the same flash resumes. The agents checkpoint every chunk
    //    (`checkpoint_bytes = 1 MiB`), which also keeps this flash slow enough to interrupt.
    let big = payload(b"GOOD", 128 << 20, 6);
    let img_big = w.image("big", &big, "k1", TARGET, "1M");
    let mut first = Command::new(bin("dpuctl"))
        .args([
            "--server", &w.api, "--json", "image", "flash", "--dpu", "d2",
        ])
        .args(["--streams", "2"])
        .arg(&img_big)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let mut seen: Vec<Value> = Vec::new();
    // Wait for the flash to be under way (the first chunk is reported at once).
    for l in lines.by_ref() {
        let v: Value = serde_json::from_str(&l.unwrap()).unwrap();
        let progress = v["phase"] == "progress";
        seen.push(v);
        if progress {
            break;
        }
    }
    let (code, _, out) = w.flash(&["--dpu", "d2", img_big.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FailedPrecondition") && out.contains("already flashing"),
        "{out}"
    );
    w.dpus.get_mut("d2").unwrap().0.kill9();
    for l in lines {
        seen.push(serde_json::from_str(&l.unwrap()).unwrap());
    }
    let st = first.wait().unwrap();
    assert_eq!(st.code(), Some(1), "{seen:?}");
    let last = seen.last().unwrap();
    assert_eq!(last["phase"], "failed", "{seen:?}");
    assert_eq!(last["failure"], "link_lost", "{last}");
    assert_eq!(
        file_bytes(&w.slot("d2", "B")).unwrap(),
        b_before,
        "the active slot is untouched by the interrupted flash"
    );
    w.restart_dpu("d2");
    eventually(
        "d2 is back",
        Duration::from_secs(60),
        || w.dpu("d2")["running_slot"] == "B",
        || w.logs(),
    );
    // Right after the restart the link may not be registered yet: retried until it is.
    let mut result = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let (code, ev, out) = w.flash(&["--dpu", "d2", img_big.to_str().unwrap()]);
        if out.contains("not connected") {
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        result = Some((code, ev, out));
        break;
    }
    let (code, ev, out) = result.expect("d2 never reconnected");
    assert_eq!(code, Some(0), "{out}\n{}", w.logs());
    let started = ev.iter().find(|e| e["phase"] == "started").unwrap();
    let resumed = started["resumed"].as_u64().unwrap();
    eprintln!("interrupted flash: {resumed} of 128 chunks were on the slot");
    assert!(
        (1..128).contains(&resumed),
        "resumed from the journal: {started}\nfirst run: {seen:?}"
    );
    let flashed = last_of(&ev, "d2");
    assert_eq!(flashed["phase"], "flashed", "{out}");
    assert_eq!(
        flashed["fetches"].as_u64().unwrap(),
        128 - resumed,
        "only the missing chunks were fetched: {flashed}"
    );
    let slot_a = file_bytes(&w.slot("d2", "A")).unwrap();
    assert_eq!(&slot_a[..big.len()], &big[..]);
    eventually(
        "d2 reports slot A armed, B still active",
        Duration::from_secs(10),
        || {
            let d2 = w.dpu("d2");
            d2["pending_slot"] == "A" && d2["tries_left"] == 3 && d2["active_slot"] == "B"
        },
        || format!("{}", w.dpu("d2")),
    );

    // Clean shutdown of everything: SIGTERM, exit 0.
    for (id, (p, _)) in w.dpus.iter_mut() {
        let st = p.terminate();
        assert!(st.is_some_and(|s| s.success()), "{id}: {st:?}");
    }
    let st = w.host.terminate();
    assert!(st.is_some_and(|s| s.success()), "host-agent: {st:?}");
    let _ = std::fs::remove_dir_all(&w.dir);
}
