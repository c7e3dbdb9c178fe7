//! What operators rely on when running apimon as a service: a durable, tamper-evident
//! audit log that keeps no secret in clear, and a control socket only root may use.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly, with their location"
)]

use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use apimon_tests::{
    daemon::{Daemon, DaemonPaths, apimon_bin, json_lines, stat_field},
    netns::Topology,
    nginx::{Nginx, curl},
    require_root,
};
use monitor::config::SchedulingPolicy;
use serde_json::Value;

const SECRET: &str = "tok-5f3c9a1e-never-in-clear";

fn audit_path(paths: &DaemonPaths) -> PathBuf {
    paths.dir.path().join("audit.jsonl")
}

fn records(path: &Path) -> Vec<Value> {
    json_lines(&std::fs::read_to_string(path).unwrap_or_default())
}

fn verify(files: &[PathBuf]) -> Output {
    Command::new(apimon_bin())
        .args(["audit", "verify"])
        .args(files)
        .output()
        .unwrap()
}

/// The audit files of `paths`, oldest first.
fn audit_files(paths: &DaemonPaths) -> Vec<PathBuf> {
    let main = audit_path(paths);
    let mut files: Vec<PathBuf> = (1..=20)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", main.display())))
        .filter(|p| p.exists())
        .collect();
    files.push(main);
    files
}

#[test]
fn acknowledged_changes_are_on_disk_and_sigterm_flushes_a_verifiable_chain() {
    require_root();
    let topo = Topology::new();
    let paths = DaemonPaths::new();
    std::fs::write(
        paths.config_file(),
        "[audit]\nmax_file_bytes = 4096\nkeep_files = 20\n",
    )
    .unwrap();
    let audit = audit_path(&paths);
    let mut daemon = Daemon::start_with(&topo.server, &topo.server_if, paths);

    // What the CLI acknowledged is in the file when it returns: no waiting.
    daemon.cli_ok(&["block", "add", "203.0.113.9", "--reason", "durable"]);
    let written = records(&audit);
    let last = written.last().expect("a record");
    assert_eq!(last["event"]["action"], "block_added", "{last}");
    assert_eq!(last["apimon"]["cidr"], "203.0.113.9/32");
    assert_eq!(written[0]["event"]["action"], "daemon_started");

    // Enough changes to rotate a few times; then SIGTERM.
    for i in 0..30 {
        let cidr = format!("198.51.100.{i}");
        daemon.cli_ok(&["block", "add", &cidr]);
        daemon.cli_ok(&["block", "rm", &cidr]);
    }
    daemon.stop();
    let files = audit_files(&daemon.paths);
    assert!(files.len() >= 3, "rotation: {files:?}");
    let last = records(files.last().unwrap());
    assert_eq!(
        last.last().unwrap()["event"]["action"],
        "daemon_stopped",
        "SIGTERM flushes everything"
    );
    let output = verify(&files);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("OK: 63 records"), "{stdout}");

    // A restart continues the chain.
    daemon.spawn();
    daemon.cli_ok(&["block", "add", "203.0.113.10"]);
    daemon.stop();
    let files = audit_files(&daemon.paths);
    assert!(verify(&files).status.success());

    // An edit anywhere is found, exit 1, naming the record.
    let target = &files[1];
    let text = std::fs::read_to_string(target).unwrap();
    std::fs::write(target, text.replacen("198.51.100.", "198.51.101.", 1)).unwrap();
    let output = verify(&files);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:", target.display())) && stderr.contains("altered"),
        "{stderr}"
    );
}

#[test]
fn secrets_are_fingerprinted_in_the_audit_log_the_event_stream_and_the_logs() {
    require_root();
    let topo = Topology::new();
    let _nginx = Nginx::start(&topo.server, &["10.77.0.1:8080"]);
    let paths = DaemonPaths::new();
    std::fs::write(
        paths.config_file(),
        "[[policy.rules]]\nid = \"watch-a\"\naction = \"log\"\nmatch.path = \"/a\"\n",
    )
    .unwrap();
    let audit = audit_path(&paths);
    let daemon = Daemon::start_with(&topo.server, &topo.server_if, paths);
    let stream = daemon.follow_events(true);
    curl(
        &topo.client,
        &[
            "-o",
            "/dev/null",
            &format!("http://10.77.0.1:8080/a?access_token={SECRET}&x=1"),
        ],
    );
    let events = stream.wait_for(Duration::from_secs(5), |events| {
        events.iter().any(|e| e["event"]["action"] == "rule_match")
            && events
                .iter()
                .any(|e| e["event"]["action"] == "http_request")
    });
    daemon.cli_ok(&["block", "add", "192.0.2.77"]); // syncs the audit log
    let matched: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"]["action"] == "rule_match")
        .collect();
    assert_eq!(matched.len(), 1, "{events:?}");
    let query = matched[0]["url"]["query"].as_str().unwrap();
    assert!(
        query.starts_with("access_token=hmac:") && query.ends_with("&x=1"),
        "{query}"
    );
    let audited = std::fs::read_to_string(&audit).unwrap();
    assert!(audited.contains("\"rule_match\""), "{audited}");
    assert!(
        audited.contains(query),
        "the same fingerprint in the audit log"
    );
    for (sink, text) in [
        ("audit log", audited),
        ("event stream", serde_json::to_string(&events).unwrap()),
        ("daemon log", daemon.log()),
    ] {
        assert!(!text.contains(SECRET), "the secret is in the {sink}");
    }
}

#[test]
fn only_root_may_use_the_control_socket() {
    require_root();
    let topo = Topology::new();
    let daemon = Daemon::start(&topo.server, &topo.server_if);
    let as_nobody = || {
        Command::new(apimon_bin())
            .args(["status", "--socket"])
            .arg(daemon.socket())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    // The file mode already keeps others out...
    let output = as_nobody();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("permission denied"));
    // ...and the daemon checks the peer's credentials, whatever the mode.
    let open_up = |path: &Path| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap()
    };
    open_up(daemon.paths.dir.path());
    open_up(daemon.socket());
    let output = as_nobody();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("permission denied: the control socket is for root only"),
        "{stderr}"
    );
    assert!(daemon.cli(&["status"]).status.success(), "root still can");
}

/// A capability set from /proc/PID/status.
fn capabilities(pid: u32, set: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{set}:")))
        .unwrap();
    u64::from_str_radix(line.trim(), 16).unwrap()
}

/// The scheduling policy (field 41 of `/proc/PID/task/TID/stat`) of each of a
/// process's threads, by thread id. A thread that ends while being read (an idle
/// blocking-pool thread) is left out.
fn scheduling_policies(pid: u32) -> Vec<(String, i32)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| {
            let task = task.ok()?.file_name().into_string().unwrap();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/stat")).ok()?;
            let policy = stat_field(&stat, 41).unwrap().parse().unwrap();
            Some((task, policy))
        })
        .collect()
}

/// Sets this test thread's scheduling policy, which the daemons it starts inherit.
fn set_own_scheduling_policy(policy: SchedulingPolicy) {
    policy.apply_to_this_thread().unwrap();
}

/// Every thread of the daemon runs under `policy`: the main one, and those it started
/// later (the audit writer), which inherit it.
fn assert_every_thread_runs_under(daemon: &Daemon, policy: SchedulingPolicy) {
    let policies = scheduling_policies(daemon.pid().unwrap());
    assert!(policies.len() > 1, "{policies:?}");
    assert!(
        policies.iter().all(|(_, p)| *p == policy.raw()),
        "{policies:?}"
    );
}

#[test]
fn the_daemon_runs_as_batch_work_unless_configured_otherwise() {
    require_root();
    let topo = Topology::new();
    // Each daemon inherits the other policy, so only its own setting explains its policy.
    set_own_scheduling_policy(SchedulingPolicy::Other);
    let mut daemon = Daemon::start(&topo.server, &topo.server_if);
    assert_every_thread_runs_under(&daemon, SchedulingPolicy::Batch);
    daemon.stop();

    let paths = DaemonPaths::new();
    std::fs::write(
        paths.config_file(),
        "[daemon]\nscheduling_policy = \"other\"\n",
    )
    .unwrap();
    set_own_scheduling_policy(SchedulingPolicy::Batch);
    let daemon = Daemon::start_with(&topo.server, &topo.server_if, paths);
    set_own_scheduling_policy(SchedulingPolicy::Other);
    assert_every_thread_runs_under(&daemon, SchedulingPolicy::Other);
}

#[test]
fn the_running_daemon_keeps_only_cap_bpf_and_cap_net_admin() {
    require_root();
    let topo = Topology::new();
    let mut daemon = Daemon::start(&topo.server, &topo.server_if);
    let pid = daemon.pid().unwrap();
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_BPF: u64 = 1 << 39;
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(capabilities(pid, set), CAP_NET_ADMIN | CAP_BPF, "{set}");
    }
    assert_eq!(capabilities(pid, "CapInh"), 0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // Every thread, not only the main one.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().file_name().into_string().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status")).unwrap();
        assert!(
            status.contains("CapEff:\t0000008000001000"),
            "thread {task}:\n{status}"
        );
    }
    // It still does its job: lists, reload, clean detach.
    daemon.cli_ok(&["block", "add", "192.0.2.1"]);
    daemon.cli_ok(&["block", "rm", "192.0.2.1"]);
    daemon.cli_ok(&["policy", "reload"]);
    assert!(daemon.cli(&["status"]).status.success());
    daemon.stop();
    let link = Command::new("ip")
        .args(["-n", &topo.server.name, "link", "show", &topo.server_if])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.status.success() && shown.contains(&topo.server_if),
        "{shown}"
    );
    assert!(
        !shown.contains("xdp"),
        "detached on SIGTERM without its other capabilities"
    );
}
