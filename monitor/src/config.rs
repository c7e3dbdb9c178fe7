//! The daemon's configuration: a typed TOML file with named defaults. Precedence:
//! a command-line flag beats the file, which beats the default.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use monitor_common::maps::{
    DEFAULT_ALLOWLIST_CAPACITY, DEFAULT_BLOCKLIST_CAPACITY, DEFAULT_IP_STATS_CAPACITY,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::policy::file::{PolicyDoc, PolicyError};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/apimon/apimon.toml";
pub const DEFAULT_SOCKET_PATH: &str = "/run/apimon/apimon.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/apimon";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/apimon";
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/apimon/audit.jsonl";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9750";
/// How often the daemon removes expired blocks (the kernel already ignores them).
pub const DEFAULT_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// `file:line:column: reason`.
    #[error("invalid config {0}")]
    Syntax(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub datapath: DatapathConfig,
    pub capture: CaptureSettings,
    pub audit: AuditSettings,
    /// Rules inline, or `file = ...`; none: the built-in policy.
    pub policy: PolicyDoc,
    /// The file this was read from (policy errors and reloads name it).
    #[serde(skip)]
    pub path: PathBuf,
}

/// Server ports whose HTTP traffic is captured by default.
pub const DEFAULT_CAPTURE_PORTS: [u16; 6] = [80, 3000, 5000, 8000, 8080, 9000];
/// Payload bytes captured per request (and per response), from its start.
pub const DEFAULT_MAX_BYTES_PER_REQUEST: u32 = 16 * 1024;
/// Size of each kernel-to-daemon sample ring (one for requests, one for responses).
pub const DEFAULT_RING_BYTES: u32 = monitor_common::maps::DEFAULT_SAMPLES_RING_BYTES;
/// Connections the daemon reassembles at once; the least recently active go first.
pub const DEFAULT_MAX_FLOWS: usize = 65_536;
/// Bytes the daemon buffers across all connections awaiting reassembly.
pub const DEFAULT_MAX_FLOW_MEMORY: usize = 256 << 20;
/// While samples flow, the daemon drains the rings this often: bounds the delay to
/// metrics and decisions; shorter costs more wake-ups.
pub const DEFAULT_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);
/// tokio's timers tick in whole milliseconds; slower than the maximum, samples back up
/// for long enough to fill a ring at line rate and decisions come late.
const MIN_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);
const MAX_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// A connection with no traffic for this long is forgotten.
pub const DEFAULT_FLOW_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureSettings {
    /// Server ports to capture (requests to them, responses from them); empty: off.
    pub ports: Vec<u16>,
    pub max_bytes_per_request: u32,
    /// Size in bytes of each of the two sample rings (requests, responses): a power of
    /// two, at least one page.
    pub ring_bytes: u32,
    pub max_flows: usize,
    pub max_flow_memory: usize,
    #[serde(with = "humantime_serde_compat")]
    pub flow_idle_timeout: std::time::Duration,
    /// How often the rings are drained while samples flow (idle, the kernel wakes the
    /// daemon on the next sample instead).
    #[serde(with = "humantime_serde_compat")]
    pub poll_interval: std::time::Duration,
    /// Route templates (`/users/{id}/profile`) for metric labels, tried before the
    /// built-in heuristic.
    pub routes: Vec<String>,
}

impl Default for CaptureSettings {
    fn default() -> Self {
        Self {
            ports: DEFAULT_CAPTURE_PORTS.to_vec(),
            max_bytes_per_request: DEFAULT_MAX_BYTES_PER_REQUEST,
            ring_bytes: DEFAULT_RING_BYTES,
            max_flows: DEFAULT_MAX_FLOWS,
            max_flow_memory: DEFAULT_MAX_FLOW_MEMORY,
            flow_idle_timeout: DEFAULT_FLOW_IDLE_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            routes: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Interfaces to attach to; empty: the interface of the default route.
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeSetting,
    /// Where the ingress datapath runs: XDP (default), or TC where XDP costs more than
    /// it saves (veth, locally generated traffic).
    pub ingress_hook: IngressHook,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub audit_log: PathBuf,
    pub metrics_addr: MetricsAddr,
    #[serde(with = "humantime_serde_compat")]
    pub sweep_interval: std::time::Duration,
    /// The daemon's CPU scheduling policy, set at start.
    pub scheduling_policy: SchedulingPolicy,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            xdp_mode: XdpModeSetting::Auto,
            ingress_hook: IngressHook::Xdp,
            socket: PathBuf::from(DEFAULT_SOCKET_PATH),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            bpffs_dir: PathBuf::from(DEFAULT_BPFFS_DIR),
            audit_log: PathBuf::from(DEFAULT_AUDIT_LOG),
            metrics_addr: MetricsAddr::default(),
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            scheduling_policy: SchedulingPolicy::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatapathConfig {
    /// Sources tracked in the per-IP statistics (LRU: the least recently seen go first).
    pub ip_stats_capacity: u32,
    /// Entries per blocklist map (host hash and prefix trie, per address family).
    pub blocklist_capacity: u32,
    /// Entries per allowlist trie (per address family).
    pub allowlist_capacity: u32,
    /// Packets per second one source may send (0: no limit); `throttle` verdicts set
    /// tighter ones per offender.
    pub rate_limit_pps: u32,
    /// Packets one source may send at once (0: `rate_limit_pps`).
    pub rate_limit_burst: u32,
    /// New TCP connections (SYN) per second one source may open (0: no limit).
    pub syn_rate_limit: u32,
    /// SYNs one source may send at once (0: `syn_rate_limit`).
    pub syn_rate_burst: u32,
}

impl DatapathConfig {
    /// The kernel's default per-source limits.
    pub fn rate_config(&self) -> monitor_common::datapath::RateConfig {
        monitor_common::datapath::RateConfig {
            pps: self.rate_limit_pps,
            pps_burst: self.rate_limit_burst,
            syn_ps: self.syn_rate_limit,
            syn_burst: self.syn_rate_burst,
        }
    }
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            ip_stats_capacity: DEFAULT_IP_STATS_CAPACITY,
            blocklist_capacity: DEFAULT_BLOCKLIST_CAPACITY,
            allowlist_capacity: DEFAULT_ALLOWLIST_CAPACITY,
            rate_limit_pps: 0,
            rate_limit_burst: 0,
            syn_rate_limit: 0,
            syn_rate_burst: 0,
        }
    }
}

/// XDP attach mode: `auto` tries native (driver) mode and falls back to generic (skb).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    #[default]
    Auto,
    Native,
    Skb,
}

impl XdpModeSetting {
    pub const fn name(self) -> &'static str {
        match self {
            XdpModeSetting::Auto => "auto",
            XdpModeSetting::Native => "native",
            XdpModeSetting::Skb => "skb",
        }
    }
}

/// Audit files rotate past this size.
pub const DEFAULT_AUDIT_MAX_FILE_BYTES: u64 = 100 << 20;
/// Rotated audit files kept.
pub const DEFAULT_AUDIT_KEEP_FILES: u32 = 10;

/// The audit log (its path is `daemon.audit_log`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    pub max_file_bytes: u64,
    pub keep_files: u32,
    /// Also print every record on standard output (the journal).
    pub stdout: bool,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_AUDIT_MAX_FILE_BYTES,
            keep_files: DEFAULT_AUDIT_KEEP_FILES,
            stdout: false,
        }
    }
}

/// The hook of the ingress datapath (blocklist, counters, request capture).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IngressHook {
    #[default]
    Xdp,
    Tc,
}

/// The daemon's CPU scheduling policy, named as `chrt` and systemd's
/// `CPUSchedulingPolicy=` name them. Set at start, it replaces the policy the daemon
/// was started with.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingPolicy {
    /// `SCHED_BATCH`: the same weight (nice value) as before, but a waking daemon does
    /// not preempt the running thread; it runs when that thread blocks or its slice
    /// ends. The daemon's work is batch work (it drains a ring that buffers tens of
    /// milliseconds), while the thread it would preempt may be the server it watches
    /// or that server's client. What it was measured to save, and to cost in reaction
    /// time, is in the CHANGELOG (a noisy machine: compare within one run).
    #[default]
    Batch,
    /// `SCHED_OTHER`, the kernel's default policy: the daemon reacts sooner on a busy
    /// host, at a cost to the workload's throughput.
    Other,
}

impl SchedulingPolicy {
    /// The kernel's number for the policy (as `/proc/<pid>/stat` shows it).
    pub const fn raw(self) -> i32 {
        match self {
            Self::Batch => libc::SCHED_BATCH,
            Self::Other => libc::SCHED_OTHER,
        }
    }

    /// Sets the calling thread's policy; threads it starts later inherit it.
    pub fn apply_to_this_thread(self) -> std::io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 names the calling thread; `param` is a valid, initialised struct.
        if unsafe { libc::sched_setscheduler(0, self.raw(), &param) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// The metrics listener, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    Listen(SocketAddr),
}

impl Default for MetricsAddr {
    fn default() -> Self {
        DEFAULT_METRICS_ADDR
            .parse()
            .map(MetricsAddr::Listen)
            .unwrap_or(MetricsAddr::Off)
    }
}

impl FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(MetricsAddr::Off);
        }
        s.parse()
            .map(MetricsAddr::Listen)
            .map_err(|_| format!("invalid metrics address {s:?}: expected HOST:PORT or `off`"))
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Off => f.write_str("off"),
            MetricsAddr::Listen(addr) => addr.fmt(f),
        }
    }
}

impl Serialize for MetricsAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MetricsAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Durations in the config read and print as the policy's (`500ms`, `15m`: positive,
/// bounded), kept as plain `Duration`s.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serialize as _, Serializer};

    use crate::policy::file::HumanDuration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        HumanDuration(*d).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        HumanDuration::deserialize(d).map(|duration| duration.0)
    }
}

impl Config {
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax(crate::policy::file::located(path, text, &e)))?;
        config.validate(path)?;
        config.policy.check(text, path)?;
        config.path = path.to_owned();
        Ok(config)
    }

    /// Reads only the `[daemon]` table (what clients need), ignoring the rest.
    pub fn load_daemon_section(path: &Path, explicitly_named: bool) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct DaemonOnly {
            #[serde(default)]
            daemon: DaemonConfig,
        }
        Self::read_with(path, explicitly_named, |text| {
            let only: DaemonOnly = toml::from_str(text)
                .map_err(|e| ConfigError::Syntax(crate::policy::file::located(path, text, &e)))?;
            Ok(Config {
                daemon: only.daemon,
                path: path.to_owned(),
                ..Config::default()
            })
        })
    }

    /// Reads the config. The default path may be missing (built-in defaults); a path the
    /// operator named must exist.
    pub fn load(path: &Path, explicitly_named: bool) -> Result<Self, ConfigError> {
        Self::read_with(path, explicitly_named, |text| Self::parse(text, path))
    }

    fn read_with(
        path: &Path,
        explicitly_named: bool,
        parse: impl FnOnce(&str) -> Result<Self, ConfigError>,
    ) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicitly_named => Ok(Config {
                path: path.to_owned(),
                ..Config::default()
            }),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let d = &self.datapath;
        for (name, value) in [
            ("datapath.ip_stats_capacity", d.ip_stats_capacity),
            ("datapath.blocklist_capacity", d.blocklist_capacity),
            ("datapath.allowlist_capacity", d.allowlist_capacity),
        ] {
            if value == 0 {
                return Err(invalid(format!("{name} must be at least 1")));
            }
        }
        for (name, value) in [
            ("datapath.rate_limit_pps", d.rate_limit_pps),
            ("datapath.rate_limit_burst", d.rate_limit_burst),
            ("datapath.syn_rate_limit", d.syn_rate_limit),
            ("datapath.syn_rate_burst", d.syn_rate_burst),
        ] {
            if value > monitor_common::datapath::MAX_RATE {
                return Err(invalid(format!(
                    "{name} must be at most {}",
                    monitor_common::datapath::MAX_RATE
                )));
            }
        }
        if self.audit.max_file_bytes < 4096 {
            return Err(invalid("audit.max_file_bytes must be at least 4096".into()));
        }
        let c = &self.capture;
        if !c.ring_bytes.is_power_of_two() || c.ring_bytes < 4096 {
            return Err(invalid(format!(
                "capture.ring_bytes must be a power of two of at least 4096, not {}",
                c.ring_bytes
            )));
        }
        if !(MIN_POLL_INTERVAL..=MAX_POLL_INTERVAL).contains(&c.poll_interval) {
            return Err(invalid(format!(
                "capture.poll_interval must be between {} and {}, not {}",
                humantime::format_duration(MIN_POLL_INTERVAL),
                humantime::format_duration(MAX_POLL_INTERVAL),
                humantime::format_duration(c.poll_interval)
            )));
        }
        if let Some(bad) = c.routes.iter().find(|r| !r.starts_with('/')) {
            return Err(invalid(format!(
                "capture.routes: {bad:?} must start with /"
            )));
        }
        if c.ports.contains(&0) {
            return Err(invalid("capture.ports cannot contain 0".into()));
        }
        if c.max_flows == 0 || c.max_flow_memory == 0 {
            return Err(invalid(
                "capture.max_flows and max_flow_memory must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("apimon.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let config = parse("").unwrap();
        assert_eq!(
            config,
            Config {
                path: "apimon.toml".into(),
                ..Config::default()
            }
        );
        assert_eq!(config.daemon.socket, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(config.daemon.metrics_addr.to_string(), DEFAULT_METRICS_ADDR);
        assert_eq!(config.datapath.ip_stats_capacity, 1 << 20);
        assert_eq!(config.daemon.scheduling_policy, SchedulingPolicy::Batch);
    }

    #[test]
    fn every_key_parses() {
        let config = parse(
            r#"
            [daemon]
            interfaces = ["eth0", "eth1"]
            xdp_mode = "skb"
            ingress_hook = "tc"
            socket = "/tmp/a.sock"
            state_dir = "/tmp/state"
            bpffs_dir = "/sys/fs/bpf/x"
            audit_log = "/tmp/audit.jsonl"
            metrics_addr = "off"
            sweep_interval = "2s"
            scheduling_policy = "other"
            [datapath]
            ip_stats_capacity = 1000
            blocklist_capacity = 2000
            allowlist_capacity = 300
            rate_limit_pps = 5000
            rate_limit_burst = 10000
            syn_rate_limit = 50
            syn_rate_burst = 100
            [capture]
            ports = [8443, 80]
            max_bytes_per_request = 4096
            ring_bytes = 1048576
            max_flows = 10
            max_flow_memory = 1000000
            flow_idle_timeout = "30s"
            poll_interval = "5ms"
            routes = ["/users/{name}/profile"]
            [audit]
            max_file_bytes = 1000000
            keep_files = 3
            stdout = true
            "#,
        )
        .unwrap();
        assert_eq!(config.daemon.interfaces, ["eth0", "eth1"]);
        assert_eq!(
            config.audit,
            AuditSettings {
                max_file_bytes: 1_000_000,
                keep_files: 3,
                stdout: true
            }
        );
        assert_eq!(config.daemon.xdp_mode, XdpModeSetting::Skb);
        assert_eq!(config.daemon.ingress_hook, IngressHook::Tc);
        assert_eq!(
            config.datapath.rate_config(),
            monitor_common::datapath::RateConfig {
                pps: 5000,
                pps_burst: 10000,
                syn_ps: 50,
                syn_burst: 100
            }
        );
        assert_eq!(config.daemon.metrics_addr, MetricsAddr::Off);
        assert_eq!(config.daemon.scheduling_policy, SchedulingPolicy::Other);
        assert_eq!(
            config.daemon.sweep_interval,
            std::time::Duration::from_secs(2)
        );
        assert_eq!(config.datapath.blocklist_capacity, 2000);
        assert_eq!(config.capture.ports, [8443, 80]);
        assert_eq!(config.capture.max_bytes_per_request, 4096);
        assert_eq!(
            config.capture.flow_idle_timeout,
            std::time::Duration::from_secs(30)
        );
        assert_eq!(
            config.capture.poll_interval,
            std::time::Duration::from_millis(5)
        );
    }

    #[test]
    fn the_packaged_example_config_is_valid_and_says_the_defaults() {
        let text = include_str!("../../packaging/apimon.toml.example");
        let config = Config::parse(text, Path::new("apimon.toml.example")).unwrap();
        assert_eq!(config.daemon, Config::default().daemon);
        assert_eq!(config.datapath, Config::default().datapath);
        assert_eq!(config.capture, Config::default().capture);
        assert_eq!(config.audit, Config::default().audit);
        assert_eq!(
            config.policy,
            Config::default().policy,
            "rules stay commented out"
        );
    }

    #[test]
    fn inline_policy_errors_name_their_place_in_the_config() {
        let err = parse("[policy]\n[[policy.rules]]\nid = \"x\"\naction = \"block\"\nmatch.path = { glob = \"[\" }\n")
            .unwrap_err();
        assert!(
            err.starts_with("invalid config apimon.toml:5:14: invalid glob"),
            "{err}"
        );
        let err = parse("[[policy.rules]]\nid = \"x\"\naction = \"throttle\"\n").unwrap_err();
        assert!(
            err.contains("apimon.toml:2:6: rule \"x\": action throttle needs throttle_pps"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_file_and_position() {
        let err = parse("[daemon]\nxdp_mode = \"turbo\"\n").unwrap_err();
        assert!(
            err.starts_with("invalid config apimon.toml:2:12: "),
            "{err}"
        );
        assert!(err.contains("turbo"), "{err}");

        let err = parse("[daemon]\nscheduling_policy = \"fifo\"\n").unwrap_err();
        assert!(
            err.starts_with("invalid config apimon.toml:2:21: ")
                && err.contains("unknown variant `fifo`, expected `batch` or `other`"),
            "{err}"
        );

        let err = parse("[daemon]\nsockets = \"/x\"\n").unwrap_err();
        assert!(err.contains("unknown field `sockets`"), "{err}");

        let err = parse("[daemon]\nmetrics_addr = \"localhost\"\n").unwrap_err();
        assert!(err.contains("expected HOST:PORT or `off`"), "{err}");

        let err = parse("[datapath]\nip_stats_capacity = 0\n").unwrap_err();
        assert!(
            err.contains("ip_stats_capacity must be at least 1"),
            "{err}"
        );

        let err = parse("[capture]\nring_bytes = 5000\n").unwrap_err();
        assert!(err.contains("power of two"), "{err}");

        let poll = |text: &str| parse(&format!("[capture]\npoll_interval = \"{text}\"\n"));
        for fine in ["1ms", "100ms"] {
            assert!(poll(fine).is_ok(), "{fine}");
        }
        for bad in ["500us", "101ms"] {
            let err = poll(bad).unwrap_err();
            assert!(
                err.contains(&format!(
                    "capture.poll_interval must be between 1ms and 100ms, not {bad}"
                )),
                "{err}"
            );
        }

        let err = parse("[capture]\nports = [80, 70000]\n").unwrap_err();
        assert!(err.starts_with("invalid config apimon.toml:2:"), "{err}");

        let err = parse("[daemon\n").unwrap_err();
        assert!(err.contains("invalid config"), "{err}");

        for zero in [
            "[daemon]\nsweep_interval = \"0s\"\n",
            "[capture]\nflow_idle_timeout = \"0s\"\n",
            "[capture]\npoll_interval = \"0s\"\n",
        ] {
            let err = parse(zero).unwrap_err();
            assert!(
                err.starts_with("invalid config apimon.toml:2:") && err.contains("positive"),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_default_file_is_defaults_but_named_file_must_exist() {
        let missing = Path::new("/nonexistent/apimon.toml");
        let defaults = Config::load(missing, false).unwrap();
        assert_eq!(defaults.path, missing);
        assert_eq!(defaults.daemon, Config::default().daemon);
        let err = Config::load(missing, true).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot read config /nonexistent/apimon.toml"),
            "{err}"
        );
    }
}
