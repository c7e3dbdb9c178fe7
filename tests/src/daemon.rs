//! The real `apimon` binary, run as a daemon inside a network namespace, and its CLI.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{netns::NetNs, unique_tag};

/// The `apimon` binary next to this test executable (target/<profile>/apimon), or
/// `APIMON_BIN`.
pub fn apimon_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("APIMON_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| {
            if deps.ends_with("deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .expect("test binary has a parent dir");
    let bin = profile_dir.join("apimon");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// Where `start_with_metrics` serves metrics (inside the daemon's namespace).
pub const METRICS_ADDR: &str = "127.0.0.1:9750";

/// One daemon's private paths: socket, state dir, pin dir, log. Removed on drop.
pub struct DaemonPaths {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub log: PathBuf,
    /// `off` unless a test wants to scrape.
    pub metrics_addr: String,
    /// Extra `apimon run` arguments (`--ingress-hook tc`, ...).
    pub run_args: Vec<String>,
    /// The `apimon` binary the daemon and the CLI run (`apimon_bin()` unless set).
    pub binary: PathBuf,
    owns_pins: bool,
}

impl DaemonPaths {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("apimon-test-")
            .tempdir()
            .expect("tempdir");
        // An empty config of our own, so a host's /etc/apimon/apimon.toml cannot interfere.
        std::fs::write(dir.path().join("apimon.toml"), "").expect("writing config");
        Self {
            socket: dir.path().join("apimon.sock"),
            state_dir: dir.path().join("state"),
            bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/apimon-test-{}", unique_tag())),
            log: dir.path().join("daemon.log"),
            metrics_addr: "off".into(),
            run_args: Vec::new(),
            binary: apimon_bin(),
            owns_pins: true,
            dir,
        }
    }

    /// The config file the daemon and the CLI read (empty unless a test writes it).
    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("apimon.toml")
    }

    /// The path flags every subcommand takes.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--socket".into(),
            self.socket.display().to_string(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--bpffs-dir".into(),
            self.bpffs_dir.display().to_string(),
            "--audit-log".into(),
            self.dir.path().join("audit.jsonl").display().to_string(),
            "--metrics-addr".into(),
            self.metrics_addr.clone(),
            "--config".into(),
            self.dir.path().join("apimon.toml").display().to_string(),
        ]
    }
}

impl Default for DaemonPaths {
    fn default() -> Self {
        Self::new()
    }
}

impl DaemonPaths {
    /// Own socket, state and log, but `other`'s pin directory (left for `other` to remove).
    pub fn sharing_pins_of(other: &DaemonPaths) -> Self {
        let mut paths = Self::new();
        paths.bpffs_dir = other.bpffs_dir.clone();
        paths.owns_pins = false;
        paths
    }
}

impl Drop for DaemonPaths {
    fn drop(&mut self) {
        if self.owns_pins {
            let _ = std::fs::remove_dir_all(&self.bpffs_dir);
        }
    }
}

/// Field `number` (3 or more, numbered as proc(5) numbers them) of a
/// `/proc/PID/stat` or `/proc/PID/task/TID/stat` text. Fields after the command name,
/// which may hold spaces and parentheses, are space-separated.
pub fn stat_field(stat: &str, number: usize) -> Option<&str> {
    let after_name = stat.rsplit_once(')')?.1;
    after_name.split_whitespace().nth(number.checked_sub(3)?)
}

/// A running `apimon run` in `ns`, attached to `iface`. Stopped on drop (and its pins
/// removed with its paths); its log is printed when a test fails.
pub struct Daemon {
    pub paths: DaemonPaths,
    ns_path: String,
    iface: String,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(ns: &NetNs, iface: &str) -> Self {
        Self::start_with(ns, iface, DaemonPaths::new())
    }

    /// Starts with metrics served at `METRICS_ADDR` inside the namespace.
    pub fn start_with_metrics(ns: &NetNs, iface: &str, run_args: &[&str]) -> Self {
        let mut paths = DaemonPaths::new();
        paths.metrics_addr = METRICS_ADDR.into();
        paths.run_args = run_args.iter().map(|a| (*a).to_owned()).collect();
        Self::start_with(ns, iface, paths)
    }

    pub fn start_with(ns: &NetNs, iface: &str, paths: DaemonPaths) -> Self {
        let mut daemon = Self {
            paths,
            ns_path: ns.path(),
            iface: iface.to_owned(),
            child: None,
        };
        daemon.spawn();
        daemon
    }

    /// Starts the process and waits until `status` answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.child = Some(
            run_command(&self.ns_path, &self.iface, &self.paths)
                .spawn()
                .expect("spawning apimon run"),
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!("apimon run exited early ({status}):\n{}", self.log());
            }
            if self.cli(&["status"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("apimon run did not become ready:\n{}", self.log());
    }

    /// CPU time (user + system) the daemon process used so far, from /proc.
    pub fn cpu_time(&self) -> Option<Duration> {
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ticks: u64 = stat_field(&stat, 14)?.parse::<u64>().ok()?
            + stat_field(&stat, 15)?.parse::<u64>().ok()?;
        let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
        Some(Duration::from_secs_f64(ticks as f64 / per_second as f64))
    }

    /// SIGTERM and wait: the clean shutdown path.
    pub fn stop(&mut self) {
        self.signal_and_wait(Signal::SIGTERM);
    }

    /// SIGKILL and wait: the crash path.
    pub fn kill(&mut self) {
        self.signal_and_wait(Signal::SIGKILL);
    }

    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` and returns at once (SIGHUP: reload).
    pub fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
            kill(pid, signal).expect("signalling the daemon");
        }
    }

    fn signal_and_wait(&mut self, signal: Signal) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = kill(pid, signal);
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("apimon did not exit after {signal}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.paths.log).unwrap_or_default()
    }

    /// Runs `apimon ARGS` with this daemon's path flags.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_with(&self.paths, args)
    }

    /// Runs the CLI and returns stdout, panicking (with the daemon log) on failure.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "apimon {} failed ({}): {}\n--- daemon log ---\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// Runs the CLI with `--json` appended and parses the output.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let text = self.cli_ok(&with_json);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("apimon {}: not JSON ({e}): {text}", args.join(" ")))
    }

    pub fn socket(&self) -> &Path {
        &self.paths.socket
    }
}

/// `apimon run --iface IFACE` with `paths`, to start inside the namespace at `ns_path`,
/// logging to `paths.log`.
fn run_command(ns_path: &str, iface: &str, paths: &DaemonPaths) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .expect("opening log");
    let mut command = Command::new(&paths.binary);
    command
        .arg("run")
        .args(["--iface", iface])
        .args(&paths.run_args)
        .args(paths.flags())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log);
    let ns_path = ns_path.to_owned();
    // SAFETY: only async-signal-safe calls (open, setns) between fork and exec.
    // Entering only the network namespace (unlike `ip netns exec`, which also
    // unshares mounts) keeps bpffs pins visible to everyone, as on a real host.
    unsafe {
        command.pre_exec(move || {
            let file = std::fs::File::open(&ns_path)?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    command
}

/// Runs `apimon run` in `ns` with `paths` and waits for it to exit on its own (a start
/// that must be refused); returns its exit code and log.
pub fn run_until_exit(ns: &NetNs, iface: &str, paths: &DaemonPaths) -> (Option<i32>, String) {
    let mut child = run_command(&ns.path(), iface, paths)
        .spawn()
        .expect("spawning apimon run");
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("apimon run was expected to exit by itself");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code(),
        std::fs::read_to_string(&paths.log).unwrap_or_default(),
    )
}

/// Runs `apimon ARGS` with the given paths (the daemon need not run).
pub fn cli_with(paths: &DaemonPaths, args: &[&str]) -> Output {
    Command::new(&paths.binary)
        .args(args)
        .args(paths.flags())
        .stdin(Stdio::null())
        .output()
        .expect("running apimon")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- apimon daemon log ---\n{}", self.log());
        }
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
            let _ = kill(pid, Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Daemon {
    /// Scrapes `/metrics` from inside the daemon's namespace.
    pub fn scrape(&self) -> String {
        let ns_path = self.ns_path.clone();
        std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let file = std::fs::File::open(ns_path).expect("opening netns");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let mut stream =
                std::net::TcpStream::connect(METRICS_ADDR).expect("connecting to /metrics");
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: apimon\r\nConnection: close\r\n\r\n")
                .expect("requesting /metrics");
            let mut response = String::new();
            stream
                .read_to_string(&mut response)
                .expect("reading /metrics");
            let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            body.to_owned()
        })
        .join()
        .expect("scrape thread")
    }
}

/// The sum of every series of a metric family (`name{...} value` lines).
pub fn metric_sum(text: &str, family: &str) -> f64 {
    let prefix = format!("{family}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of the sample whose name and labels are exactly `series` (as printed,
/// labels sorted), or None.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// One JSON value a line (`events --json`, the audit log); a line that is not JSON fails
/// the test.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect()
}

/// `apimon events --follow --json` running in the background, as an operator would
/// leave it in a terminal; every line it printed is kept.
pub struct EventStream {
    child: Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
}

/// The block `follow_events` adds and removes to know its subscription is live; its
/// events are not kept.
const SUBSCRIPTION_MARKER: &str = "192.0.2.254/32";

impl Daemon {
    /// Follows events; `http` adds one event per observed exchange. Returns once the
    /// subscription is in place, so nothing sent afterwards is missed.
    pub fn follow_events(&self, http: bool) -> EventStream {
        let mut args = vec!["events", "--follow", "--json"];
        if http {
            args.push("--http");
        }
        let mut child = Command::new(&self.paths.binary)
            .args(&args)
            .args(self.paths.flags())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning apimon events");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = lines.clone();
        let (live_tx, live_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("events printed a non-JSON line {line:?}: {e}"));
                if value["apimon"]["cidr"] == SUBSCRIPTION_MARKER {
                    if value["event"]["action"] == "block_removed" {
                        let _ = live_tx.send(());
                    }
                    continue;
                }
                collected.lock().unwrap().push(value);
            }
        });
        // The subscription exists once the daemon counts it: wait for a marker event.
        self.cli_ok(&["block", "add", SUBSCRIPTION_MARKER, "--reason", "marker"]);
        self.cli_ok(&["block", "rm", SUBSCRIPTION_MARKER]);
        live_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the event stream never showed the subscription marker");
        EventStream { child, lines }
    }
}

impl EventStream {
    /// Everything printed so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until `done` holds over the events printed so far (or the timeout ends);
    /// returns them either way.
    pub fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let start = Instant::now();
        loop {
            let events = self.events();
            if done(&events) || start.elapsed() > timeout {
                return events;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The observed HTTP requests, in order.
    pub fn http_requests(&self) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"]["action"] == "http_request")
            .collect()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool check metrics` on an exposition; its complaints on failure.
pub fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running promtool (apt-get install prometheus): {e}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::stat_field;

    #[test]
    fn stat_fields_are_counted_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "42 (a) (b c) S 1 2 3\n";
        assert_eq!(stat_field(stat, 3), Some("S"));
        assert_eq!(stat_field(stat, 6), Some("3"));
        assert_eq!(stat_field(stat, 7), None);
        assert_eq!(stat_field(stat, 2), None, "the name is not a field here");
    }
}
