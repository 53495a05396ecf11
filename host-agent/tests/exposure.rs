//! Secure by default, against the real binary: a listener configured beyond loopback (this
//! build has no TLS) makes the daemon refuse to start, exit non-zero, and name the field —
//! before it binds anything or contacts etcd.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn a_listener_beyond_loopback_without_tls_stops_the_daemon_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("ha-exposure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (field, api, metrics) in [
        ("api.listen", "0.0.0.0:50999", "127.0.0.1:0"),
        ("metrics.listen", "127.0.0.1:0", "[::]:9999"),
    ] {
        let cfg = format!(
            "[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\n[api]\nlisten = \"{api}\"\n[metrics]\nlisten = \"{metrics}\"\n"
        );
        let path = dir.join("host-agent.toml");
        std::fs::write(&path, cfg).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_host-agent"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{field}: the daemon started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(field) && err.contains("not a loopback address"),
            "{field}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
