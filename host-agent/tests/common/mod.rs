//! A real etcd for tests: started on loopback with free ports and its own data directory,
//! stopped by PID when dropped.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    missing_debug_implementations
)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use host_agent::store::{Store, StoreConfig};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The etcd binary (Debian's etcd-server), overridable with `ETCD_BIN`.
fn etcd_bin() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".to_owned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd process.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd and waits (bounded) until it answers.
    pub async fn start() -> Etcd {
        let dir = std::env::temp_dir().join(format!(
            "dpucp-etcd-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut e = Etcd {
            child: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
        };
        // A free port found by binding and releasing it can be taken by a parallel test before
        // etcd binds it: then try again with new ports.
        for _ in 0..5 {
            if e.spawn_once().await {
                return e;
            }
            e.client_port = free_port();
            e.peer_port = free_port();
            let _ = std::fs::remove_dir_all(e.dir.join("data"));
        }
        panic!("etcd could not bind free ports in 5 attempts");
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The PID of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn spawn(&mut self) {
        assert!(self.spawn_once().await, "etcd could not bind its ports");
    }

    /// Starts etcd; false if it exited because a port was taken.
    async fn spawn_once(&mut self) -> bool {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        let child = Command::new(etcd_bin())
            .args([
                "--name",
                "t",
                "--data-dir",
                self.dir.join("data").to_str().unwrap(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("t={peer}"),
                "--log-level",
                "warn",
                "--logger",
                "zap",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {}: {e} (apt install etcd-server)", etcd_bin())
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(store) = Store::connect(&self.config()).await {
                if store.snapshot().await.is_ok() {
                    return true;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
                if log.contains("address already in use") {
                    self.child = None;
                    return false;
                }
                panic!("etcd exited with {status}: {log}");
            }
            assert!(Instant::now() < deadline, "etcd not healthy within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A store config for this etcd with a short bound.
    pub fn config(&self) -> StoreConfig {
        StoreConfig {
            endpoints: vec![self.endpoint()],
            timeout: Duration::from_secs(2),
            max_txn_ops: 128,
        }
    }

    /// A connected store.
    pub async fn store(&self) -> Store {
        Store::connect(&self.config()).await.unwrap()
    }

    /// Kills etcd (by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Runs etcdctl against this etcd and returns its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
