//! The agent's configuration file (TOML).
//!
//! ```toml
//! dpu_id = "dpu-a"
//!
//! [eal]
//! args = ["-l", "0", "--no-huge", "--no-pci", "--no-shconf", "-m", "512"]
//!
//! [[ports]]
//! name = "net_tap0"                      # the ethdev name
//! device = "net_tap0,iface=dpa-up"       # a vdev string, or a PCI address (0000:03:00.0)
//! role = "uplink"                        # or "vpc"
//!
//! [lcores]
//! forwarding = 0                         # the lcore that runs the software pipeline
//!
//! [link]
//! listen = "127.0.0.1:7700"              # where the host agent connects
//!
//! [limits]
//! nat_sessions = 65536
//! mbufs = 8191
//!
//! [ha]                                   # optional: this DPU is member a or b of a pair
//! member = "a"                           # "a" allocates NAT ports from the first half of
//!                                        # every pool's port range, "b" from the second
//! sync_listen = "127.0.0.1:7801"         # where this member takes the active peer's stream
//! peer = "127.0.0.1:7802"                # the peer's sync_listen (dialled while active)
//! ```
//!
//! Every bad field is reported with its path (`ports[1].device`), never a panic.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

/// What a port is for. The model the host sends must agree: uplinks carry the underlay, VPC
/// ports face a VPC's hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Underlay-facing.
    Uplink,
    /// VPC-facing.
    Vpc,
}

/// One port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// The ethdev name DPDK gives the port (`net_tap0`, `0000:03:00.0`).
    pub name: String,
    /// How EAL gets it: a vdev string (`net_tap0,iface=x`) or a PCI address.
    pub device: String,
    /// What it is for.
    pub role: Role,
}

impl PortConfig {
    /// Whether `device` is a PCI address (`-a`) rather than a vdev (`--vdev`).
    pub fn is_pci(&self) -> bool {
        is_pci_address(&self.device)
    }
}

fn is_pci_address(s: &str) -> bool {
    // domain:bus:device.function, hex digits: 0000:03:00.0
    let parts: Vec<&str> = s.split([':', '.']).collect();
    matches!(parts.as_slice(), [d, b, dev, f]
        if d.len() == 4 && b.len() == 2 && dev.len() == 2 && f.len() == 1
            && parts.iter().all(|p| p.chars().all(|c| c.is_ascii_hexdigit())))
}

/// EAL settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EalConfig {
    /// Arguments for `rte_eal_init` (the agent adds `--vdev`/`-a` for the ports).
    pub args: Vec<String>,
}

/// Lcore layout.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LcoreConfig {
    /// The lcore the software pipeline runs on (one forwarding lcore in this version).
    pub forwarding: u32,
}

/// The host link.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Listen address.
    pub listen: String,
}

/// Table and pool sizes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// NAT sessions per stateful rule.
    pub nat_sessions: usize,
    /// Mbufs in the packet pool.
    pub mbufs: u32,
    /// Routes the software tables hold.
    pub max_routes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nat_sessions: 1 << 16,
            mbufs: 8191,
            max_routes: 1 << 21,
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This DPU's identity (reported to the host agent).
    pub dpu_id: String,
    /// EAL.
    pub eal: EalConfig,
    /// Ports, in the order EAL creates them.
    pub ports: Vec<PortConfig>,
    /// Lcores.
    pub lcores: LcoreConfig,
    /// Host link.
    pub link: LinkConfig,
    /// Sizes.
    #[serde(default)]
    pub limits: Limits,
    /// Where rules go (absent: the ports, through rte_flow).
    #[serde(default)]
    pub nic: Option<NicConfig>,
    /// Image slots and boot control (absent: this agent does not flash images).
    #[serde(default)]
    pub image: Option<ImageConfig>,
    /// Membership of an A/B pair (absent: a single gateway, the whole NAT port range).
    #[serde(default)]
    pub ha: Option<HaConfig>,
}

/// Which member of an A/B pair this DPU is.
pub use flow_offload::ha::link::Member;

/// `[ha]`: membership of an A/B pair and the NAT session sync channel (see `crate::ha`).
///
/// The sync stream is plain TCP: no encryption, no peer authentication yet (issue 13 adds
/// mutual TLS with the node identities, in `crate::ha::secure_sync_stream`). Until then
/// `sync_listen` must be a loopback address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// This member.
    pub member: Member,
    /// Where this member accepts the active peer's sync connection (as standby).
    pub sync_listen: String,
    /// The peer's `sync_listen`, dialled while this member is active.
    pub peer: String,
    /// Change log entries per NAT rule on the active (overflow forces a snapshot).
    #[serde(default = "default_change_log")]
    pub change_log: usize,
    /// Seconds between keepalive passes that re-send every session with traffic since the
    /// previous pass, so the standby's copies do not expire (below the shortest NAT
    /// lifetime, ICMP's 60 s).
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
}

fn default_change_log() -> usize {
    1 << 16
}

fn default_keepalive() -> u64 {
    20
}

impl HaConfig {
    /// The listen address.
    pub fn sync_listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        let a: SocketAddr = self
            .sync_listen
            .parse()
            .map_err(|e| invalid("ha.sync_listen", format!("not an address:port: {e}")))?;
        if !a.ip().is_loopback() {
            return Err(invalid(
                "ha.sync_listen",
                format!(
                    "{a} is not a loopback address: the sync stream has no TLS yet (issue 13 adds mutual TLS), so it may only listen on 127.0.0.1 or ::1"
                ),
            ));
        }
        Ok(a)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.peer
            .parse()
            .map_err(|e| invalid("ha.peer", format!("not an address:port: {e}")))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let listen = self.sync_listen_addr()?;
        let peer = self.peer_addr()?;
        if peer == listen {
            return Err(invalid("ha.peer", "the same address as ha.sync_listen"));
        }
        if self.change_log == 0 || self.change_log > flow_offload::soft::nat::MAX_CHANGE_LOG {
            return Err(invalid(
                "ha.change_log",
                format!("1 to {}", flow_offload::soft::nat::MAX_CHANGE_LOG),
            ));
        }
        if self.keepalive_secs == 0 || self.keepalive_secs > 50 {
            return Err(invalid(
                "ha.keepalive_secs",
                "1 to 50 (below the shortest NAT session lifetime, 60 s)",
            ));
        }
        Ok(())
    }
}

/// `[image]`: the A/B slots this agent flashes, whom it trusts, and its boot health check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Slot A: a block device, or a file (created when missing).
    pub slot_a: std::path::PathBuf,
    /// Slot B.
    pub slot_b: std::path::PathBuf,
    /// Capacity of file slots in bytes (block devices report their own size).
    #[serde(default = "default_slot_capacity")]
    pub slot_capacity: u64,
    /// Flash lock, resume journals and the boot-control state (persistent storage).
    pub state_dir: std::path::PathBuf,
    /// Public key files or directories of `*.pub` files; images signed by anything else are
    /// refused.
    pub trusted_keys: Vec<std::path::PathBuf>,
    /// This DPU's model: images for another target are refused.
    pub target: String,
    /// Run at start-up; exit status 0 means healthy. A slot on trial commits only when it
    /// passes. `DPUCP_SLOT` (`A`/`B`) and `DPUCP_SLOT_PATH` are set for it.
    #[serde(default)]
    pub health_command: Vec<String>,
    /// Seconds the health command may take before it counts as failed.
    #[serde(default = "default_health_timeout")]
    pub health_timeout_secs: u64,
    /// Bytes written between journal checkpoints (sync + journal): the most an interrupted
    /// flash fetches again, against one sync per checkpoint.
    #[serde(default = "default_checkpoint_bytes")]
    pub checkpoint_bytes: u64,
}

fn default_checkpoint_bytes() -> u64 {
    images::slot::DEFAULT_CHECKPOINT_BYTES
}

fn default_slot_capacity() -> u64 {
    4 << 30
}

fn default_health_timeout() -> u64 {
    30
}

/// `[nic]`: the hardware backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// `"dpdk"` (rte_flow/rte_mtr on the ports, capabilities probed) or `"reference"` (the
    /// reference NIC model under a named profile: benchmarks and labs without offload
    /// hardware; packets still cross the DPDK ports and the software lcore).
    pub backend: String,
    /// The reference NIC's profile: `"full"` (default), `"partial"`, `"tap-like"`, `"none"`.
    #[serde(default)]
    pub profile: Option<String>,
    /// The reference NIC's rule capacity (default: the profile's).
    #[serde(default)]
    pub max_rules: Option<u32>,
}

impl Config {
    /// The reference NIC's capabilities, when `[nic] backend = "reference"`.
    pub fn reference_caps(&self) -> Option<flow_offload::caps::Caps> {
        use flow_offload::caps::{Caps, Profile};
        let n = self.nic.as_ref().filter(|n| n.backend == "reference")?;
        let profile = match n.profile.as_deref().unwrap_or("full") {
            "partial" => Profile::Partial,
            "tap-like" => Profile::TapLike,
            "none" => Profile::None,
            _ => Profile::Full,
        };
        let mut caps = Caps::profile(profile);
        if let Some(m) = n.max_rules {
            caps.max_rules = m;
        }
        Some(caps)
    }
}

/// A configuration error, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The path.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// Not valid TOML or a field of the wrong type.
    #[error("{0}")]
    Syntax(String),
    /// A field with a bad value.
    #[error("{field}: {problem}")]
    Invalid {
        /// Its path (`ports[1].device`).
        field: String,
        /// What is wrong.
        problem: String,
    },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Config::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// The listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        let a: SocketAddr = self
            .link
            .listen
            .parse()
            .map_err(|e| invalid("link.listen", format!("not an address:port: {e}")))?;
        if !a.ip().is_loopback() {
            // Nothing listens beyond loopback without TLS, and the link has none yet.
            return Err(invalid(
                "link.listen",
                format!(
                    "{a} is not a loopback address: the host link has no TLS yet, so it may only listen on 127.0.0.1 or ::1"
                ),
            ));
        }
        Ok(a)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let id_ok = !self.dpu_id.is_empty()
            && self.dpu_id.len() <= 64
            && self
                .dpu_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !id_ok {
            return Err(invalid(
                "dpu_id",
                "1-64 characters of letters, digits, '-', '_', '.'",
            ));
        }
        if self.ports.is_empty() {
            return Err(invalid("ports", "at least one port is needed"));
        }
        let mut names = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            let bad_text = |s: &str| s.is_empty() || s.chars().any(|c| c.is_whitespace());
            if bad_text(&p.name) {
                return Err(invalid(format!("ports[{i}].name"), "empty or has spaces"));
            }
            if bad_text(&p.device) {
                return Err(invalid(format!("ports[{i}].device"), "empty or has spaces"));
            }
            if !p.is_pci() && !p.device.starts_with("net_") {
                return Err(invalid(
                    format!("ports[{i}].device"),
                    "neither a PCI address (0000:03:00.0) nor a vdev (net_tap0,...)",
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(invalid(
                    format!("ports[{i}].name"),
                    format!("{:?} appears twice", p.name),
                ));
            }
        }
        if self.ports.len() > usize::from(u16::MAX) {
            return Err(invalid("ports", "too many ports"));
        }
        for (i, a) in self.eal.args.iter().enumerate() {
            if a.starts_with("--vdev") || a == "-a" || a.starts_with("--allow") {
                return Err(invalid(
                    format!("eal.args[{i}]"),
                    "ports are given in [[ports]], not as EAL arguments",
                ));
            }
        }
        self.listen_addr()?;
        if self.limits.mbufs < 1023 {
            return Err(invalid("limits.mbufs", "at least 1023"));
        }
        if self.limits.nat_sessions == 0 {
            return Err(invalid("limits.nat_sessions", "at least 1"));
        }
        if let Some(im) = &self.image {
            if im.slot_a == im.slot_b {
                return Err(invalid("image.slot_b", "the same path as image.slot_a"));
            }
            if im.trusted_keys.is_empty() {
                return Err(invalid(
                    "image.trusted_keys",
                    "at least one key: a DPU that trusts nothing can never be updated",
                ));
            }
            if im.target.is_empty() {
                return Err(invalid("image.target", "empty"));
            }
            if im.health_command.first().is_some_and(String::is_empty) {
                return Err(invalid("image.health_command[0]", "empty program"));
            }
            if im.health_timeout_secs == 0 {
                return Err(invalid("image.health_timeout_secs", "at least 1"));
            }
            if im.checkpoint_bytes == 0 {
                return Err(invalid("image.checkpoint_bytes", "at least 1"));
            }
        }
        if let Some(ha) = &self.ha {
            ha.validate()?;
        }
        if let Some(n) = &self.nic {
            if n.backend != "dpdk" && n.backend != "reference" {
                return Err(invalid("nic.backend", "\"dpdk\" or \"reference\""));
            }
            if let Some(p) = &n.profile {
                if n.backend != "reference" {
                    return Err(invalid("nic.profile", "only for the reference backend"));
                }
                if !["full", "partial", "tap-like", "none"].contains(&p.as_str()) {
                    return Err(invalid(
                        "nic.profile",
                        "\"full\", \"partial\", \"tap-like\" or \"none\"",
                    ));
                }
            }
            if n.max_rules == Some(0) {
                return Err(invalid("nic.max_rules", "at least 1"));
            }
        }
        Ok(())
    }

    /// The full EAL argument list: program name, the configured arguments, then one
    /// `--vdev`/`-a` per port.
    pub fn eal_args(&self) -> Vec<String> {
        let mut v = vec!["dpu-agent".to_owned()];
        v.extend(self.eal.args.iter().cloned());
        for p in &self.ports {
            if p.is_pci() {
                v.push("-a".into());
                v.push(p.device.clone());
            } else {
                v.push(format!("--vdev={}", p.device));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const GOOD: &str = r#"
dpu_id = "dpu-a"
[eal]
args = ["-l", "0", "--no-huge"]
[[ports]]
name = "net_tap0"
device = "net_tap0,iface=dpa-up"
role = "uplink"
[[ports]]
name = "0000:03:00.0"
device = "0000:03:00.0"
role = "vpc"
[lcores]
forwarding = 0
[link]
listen = "127.0.0.1:7700"
"#;

    #[test]
    fn good_file_parses_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.ports.len(), 2);
        assert_eq!(c.ports[0].role, Role::Uplink);
        assert!(c.ports[1].is_pci());
        assert_eq!(c.limits, Limits::default());
        assert_eq!(
            c.eal_args(),
            [
                "dpu-agent",
                "-l",
                "0",
                "--no-huge",
                "--vdev=net_tap0,iface=dpa-up",
                "-a",
                "0000:03:00.0"
            ]
        );
    }

    fn err_of(text: &str) -> ConfigError {
        Config::parse(text).unwrap_err()
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases = [
            (GOOD.replace("dpu-a", "dpu a"), "dpu_id"),
            (
                GOOD.replace("net_tap0,iface=dpa-up", "tap0"),
                "ports[0].device",
            ),
            (
                GOOD.replace("\"0000:03:00.0\"\nrole", "\"\"\nrole"),
                "ports[1].device",
            ),
            (
                GOOD.replace("name = \"0000:03:00.0\"", "name = \"net_tap0\""),
                "ports[1].name",
            ),
            (GOOD.replace("127.0.0.1:7700", "localhost"), "link.listen"),
            // Not loopback, and the link has no TLS.
            (
                GOOD.replace("127.0.0.1:7700", "0.0.0.0:7700"),
                "link.listen",
            ),
            (
                GOOD.replace("127.0.0.1:7700", "192.0.2.7:7700"),
                "link.listen",
            ),
            (
                GOOD.replace("\"--no-huge\"", "\"--vdev=net_null0\""),
                "eal.args[2]",
            ),
            (
                format!("{GOOD}\n[nic]\nbackend = \"fpga\"\n"),
                "nic.backend",
            ),
            (
                format!("{GOOD}\n[nic]\nbackend = \"reference\"\nprofile = \"best\"\n"),
                "nic.profile",
            ),
            (
                format!("{GOOD}\n[nic]\nbackend = \"dpdk\"\nprofile = \"full\"\n"),
                "nic.profile",
            ),
            (
                format!("{GOOD}\n[nic]\nbackend = \"reference\"\nmax_rules = 0\n"),
                "nic.max_rules",
            ),
            (
                format!("{GOOD}\n{IMAGE}").replace("/s/b", "/s/a"),
                "image.slot_b",
            ),
            (
                format!("{GOOD}\n{IMAGE}").replace("[\"/k\"]", "[]"),
                "image.trusted_keys",
            ),
            (
                format!("{GOOD}\n{IMAGE}").replace("\"bf3\"", "\"\""),
                "image.target",
            ),
            (
                format!("{GOOD}\n{IMAGE}health_command = [\"\"]\n"),
                "image.health_command[0]",
            ),
            (
                format!("{GOOD}\n{IMAGE}health_timeout_secs = 0\n"),
                "image.health_timeout_secs",
            ),
            (
                format!("{GOOD}\n{IMAGE}checkpoint_bytes = 0\n"),
                "image.checkpoint_bytes",
            ),
            (
                format!("{GOOD}\n{HA}").replace("127.0.0.1:7801", "10.0.0.1:7801"),
                "ha.sync_listen",
            ),
            (
                format!("{GOOD}\n{HA}").replace("127.0.0.1:7801", "0.0.0.0:7801"),
                "ha.sync_listen",
            ),
            (
                format!("{GOOD}\n{HA}").replace("127.0.0.1:7801", "localhost:7801"),
                "ha.sync_listen",
            ),
            (
                format!("{GOOD}\n{HA}").replace("127.0.0.1:7802", "peer"),
                "ha.peer",
            ),
            (
                format!("{GOOD}\n{HA}").replace("127.0.0.1:7802", "127.0.0.1:7801"),
                "ha.peer",
            ),
            (format!("{GOOD}\n{HA}change_log = 0\n"), "ha.change_log"),
            (
                format!("{GOOD}\n{HA}keepalive_secs = 60\n"),
                "ha.keepalive_secs",
            ),
        ];
        for (text, field) in cases {
            match err_of(&text) {
                ConfigError::Invalid { field: f, .. } => assert_eq!(f, field, "{text}"),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    const HA: &str =
        "[ha]\nmember = \"b\"\nsync_listen = \"127.0.0.1:7801\"\npeer = \"127.0.0.1:7802\"\n";

    #[test]
    fn ha_section_is_optional_and_parses_with_defaults() {
        assert_eq!(Config::parse(GOOD).unwrap().ha, None);
        let ha = Config::parse(&format!("{GOOD}\n{HA}")).unwrap().ha.unwrap();
        assert_eq!(ha.member, Member::B);
        assert_eq!(
            ha.member.block(),
            flow_offload::soft::nat::AllocBlock::new(1, 2)
        );
        assert_eq!(ha.member.other(), Member::A);
        assert_eq!(ha.sync_listen_addr().unwrap().port(), 7801);
        assert_eq!(ha.peer_addr().unwrap().port(), 7802);
        assert_eq!((ha.change_log, ha.keepalive_secs), (1 << 16, 20));
        let v6 = format!("{GOOD}\n{HA}").replace("127.0.0.1:7801", "[::1]:7801");
        assert!(Config::parse(&v6).is_ok());
        let e = err_of(&format!("{GOOD}\n{HA}").replace("\"b\"", "\"c\""));
        assert!(matches!(e, ConfigError::Syntax(_)), "{e:?}");
        let e = err_of(&format!("{GOOD}\n{HA}").replace("127.0.0.1:7801", "192.0.2.1:7801"));
        assert!(e.to_string().contains("TLS"), "{e}");
    }

    const IMAGE: &str = "[image]\nslot_a = \"/s/a\"\nslot_b = \"/s/b\"\nstate_dir = \"/s\"\ntrusted_keys = [\"/k\"]\ntarget = \"bf3\"\n";

    #[test]
    fn image_section_parses_with_defaults() {
        let c = Config::parse(&format!("{GOOD}\n{IMAGE}")).unwrap();
        let im = c.image.unwrap();
        assert_eq!(im.slot_capacity, 4 << 30);
        assert_eq!(im.health_timeout_secs, 30);
        assert!(im.health_command.is_empty());
        assert_eq!(im.target, "bf3");
    }

    #[test]
    fn syntax_and_type_errors_say_where() {
        let e = err_of(&GOOD.replace("role = \"uplink\"", "role = \"upstream\""));
        let ConfigError::Syntax(m) = e else {
            panic!("{e:?}")
        };
        assert!(m.contains("upstream"), "{m}");
        let e = err_of(&GOOD.replace("forwarding = 0", "forwarding = \"x\""));
        assert!(matches!(e, ConfigError::Syntax(_)), "{e:?}");
        let e = err_of(&format!("{GOOD}\nbogus = 1\n"));
        assert!(matches!(e, ConfigError::Syntax(m) if m.contains("bogus")));
        let e = err_of(&GOOD.replace("[[ports]]", "[[portz]]"));
        assert!(matches!(e, ConfigError::Syntax(_)));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let e = Config::load(Path::new("/nonexistent/dpu-agent.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
    }
}
