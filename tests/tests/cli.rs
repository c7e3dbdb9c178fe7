//! Bad input of every kind gets a one-line error and the contract's exit code; the
//! daemon survives garbage on its socket.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly, with their location"
)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    process::Output,
};

use apimon_tests::{
    daemon::{Daemon, DaemonPaths, cli_with, run_until_exit},
    netns::NetNs,
    require_root,
};

fn assert_fails(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr:?}"
    );
    assert!(stderr.starts_with("apimon: "), "{stderr:?}");
    assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    assert!(!stderr.contains("panicked"), "{stderr:?}");
}

#[test]
fn bad_usage_is_exit_2_without_a_daemon() {
    let paths = DaemonPaths::new();
    assert_fails(
        &cli_with(&paths, &["block", "add", "10.0.0.300"]),
        2,
        "invalid CIDR \"10.0.0.300\"",
    );
    assert_fails(
        &cli_with(&paths, &["block", "add", "10.0.0.1/40"]),
        2,
        "invalid CIDR",
    );
    assert_fails(
        &cli_with(&paths, &["block", "rm", "zzz"]),
        2,
        "invalid CIDR \"zzz\"",
    );
    assert_fails(
        &cli_with(&paths, &["allow", "add", "::1/200"]),
        2,
        "invalid CIDR",
    );
    assert_fails(
        &cli_with(&paths, &["block", "add", "10.0.0.1", "--ttl", "soon"]),
        2,
        "invalid duration \"soon\"",
    );
    assert_fails(
        &cli_with(&paths, &["block", "add", "10.0.0.1", "--ttl", "0s"]),
        2,
        "duration must be positive",
    );
    assert_fails(&cli_with(&paths, &["block", "add"]), 2, "required");
    assert_fails(
        &cli_with(&paths, &["stats", "--frobnicate"]),
        2,
        "--frobnicate",
    );
    assert_fails(&cli_with(&paths, &["top", "--by", "color"]), 2, "color");
    assert_fails(&cli_with(&paths, &["launch"]), 2, "launch");
    assert_fails(
        &cli_with(&paths, &["run", "--xdp-mode", "turbo"]),
        2,
        "turbo",
    );
}

#[test]
fn an_unknown_interface_is_bad_input() {
    require_root();
    let paths = DaemonPaths::new();
    let ns = NetNs::new("noif");
    let (code, log) = run_until_exit(&ns, "nosuch0", &paths);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("interface nosuch0 does not exist"), "{log}");
}

#[test]
fn a_broken_config_file_is_exit_2_naming_the_line() {
    let paths = DaemonPaths::new();
    let config = paths.dir.path().join("apimon.toml");
    std::fs::write(&config, "[daemon]\nxdp_mode = \"warp\"\n").unwrap();
    assert_fails(
        &cli_with(&paths, &["stats"]),
        2,
        "apimon.toml:2:12: unknown variant `warp`",
    );
}

#[test]
fn every_client_command_is_exit_3_without_a_daemon() {
    let paths = DaemonPaths::new();
    for args in [
        &["status"][..],
        &["stats"],
        &["top"],
        &["block", "ls"],
        &["block", "add", "10.0.0.1"],
        &["block", "rm", "10.0.0.1"],
        &["allow", "ls"],
        &["allow", "add", "10.0.0.1"],
        &["events"],
        &["events", "--follow", "--http"],
        &["policy", "reload"],
        &["policy", "show"],
    ] {
        assert_fails(&cli_with(&paths, args), 3, "daemon not reachable");
    }
}

#[test]
fn help_and_version_exit_0() {
    let paths = DaemonPaths::new();
    for args in [&["--help"][..], &["--version"], &["block", "add", "--help"]] {
        let output = cli_with(&paths, args);
        assert!(output.status.success(), "{args:?}");
        assert!(!output.stdout.is_empty());
    }
    let help = String::from_utf8(cli_with(&paths, &["--help"]).stdout).unwrap();
    assert!(help.contains("Examples:"), "{help}");
}

#[test]
fn operation_failures_are_exit_1_and_garbage_on_the_socket_is_refused() {
    require_root();
    let ns = NetNs::new("cli");
    // No dummy driver on every kernel: a veth pair inside the namespace will do.
    ns.ip(&[
        "link", "add", "cli0", "type", "veth", "peer", "name", "cli1",
    ]);
    ns.ip(&["link", "set", "cli0", "up"]);
    ns.ip(&["link", "set", "cli1", "up"]);
    let daemon = Daemon::start(&ns, "cli0");

    assert_fails(
        &daemon.cli(&["block", "rm", "192.0.2.1"]),
        1,
        "not on the blocklist: 192.0.2.1/32",
    );
    daemon.cli_ok(&["block", "add", "192.0.2.1"]);
    // Removing a listed and an unlisted entry together changes nothing.
    assert_fails(
        &daemon.cli(&["block", "rm", "192.0.2.1", "192.0.2.2"]),
        1,
        "192.0.2.2/32",
    );
    assert!(daemon.cli_ok(&["block", "ls"]).contains("192.0.2.1/32"));

    let mut stream = UnixStream::connect(daemon.socket()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for garbage in [
        &b"hello\n"[..],
        b"\xff\xfe\n",
        b"{\"version\":7,\"request\":{\"op\":\"stats\"}}\n",
        b"{\"version\":1,\"request\":{\"op\":\"block_add\",\"cidrs\":[\"not-an-ip\"]}}\n",
        b"{\"version\":1,\"request\":{\"op\":\"block_add\",\"cidrs\":[]}}\n",
        b"{\"version\":1,\"request\":{\"op\":\"block_add\",\"cidrs\":[\"10.0.0.1\"],\"ttl_ms\":0}}\n",
        b"[1,2,3]\n",
    ] {
        stream.write_all(garbage).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["reply"]["error"]["kind"], "bad_request", "{line}");
    }
    // The same connection still serves a valid request.
    stream
        .write_all(b"{\"version\":1,\"request\":{\"op\":\"stats\"}}\n")
        .unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["reply"]["ok"]["blocklist_entries"], 1, "{line}");

    // An oversize request is refused and the connection closed; the daemon lives on.
    let mut big = UnixStream::connect(daemon.socket()).unwrap();
    let chunk = vec![b'x'; 1 << 16];
    for _ in 0..20 {
        if big.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut line = String::new();
    BufReader::new(big).read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["reply"]["error"]["kind"], "bad_request", "{line}");
    assert!(line.contains("larger than"), "{line}");
    daemon.cli_ok(&["status"]);

    // A second daemon on the same pin directory is refused and harms nothing.
    let second = DaemonPaths::sharing_pins_of(&daemon.paths);
    let (code, log) = run_until_exit(&ns, "cli0", &second);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("another apimon daemon is using it"), "{log}");
    assert!(
        !second.socket.exists(),
        "the refused daemon left its socket behind"
    );
    daemon.cli_ok(&["status"]);
    assert!(daemon.cli_ok(&["block", "ls"]).contains("192.0.2.1/32"));
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_definitions() {
    let paths = DaemonPaths::new();
    for shell in ["bash", "zsh", "fish"] {
        let output = cli_with(&paths, &["completions", shell]);
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(
            script.contains("policy") && script.contains("verify"),
            "{shell}: {script}"
        );
    }
    let bash = cli_with(&paths, &["completions", "bash"]).stdout;
    let check = std::process::Command::new("bash")
        .args(["-n", "/dev/stdin"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(&bash)?;
            child.wait()
        })
        .unwrap();
    assert!(check.success(), "the bash completion script parses");
    let man = String::from_utf8(cli_with(&paths, &["man"]).stdout).unwrap();
    assert!(
        man.starts_with(".ie") || man.contains(".TH apimon"),
        "{man}"
    );
    for word in ["block", "events", "audit", "config"] {
        assert!(man.contains(word), "{word} missing from the man page");
    }
    let help = String::from_utf8(cli_with(&paths, &["events", "--help"]).stdout).unwrap();
    assert!(
        help.contains("Examples:") && help.contains("--follow"),
        "{help}"
    );
    assert_fails(
        &cli_with(&paths, &["completions", "tcsh"]),
        2,
        "invalid value",
    );
}
