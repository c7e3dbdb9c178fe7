//! The enforcement loop end to end: nginx in one namespace, curl clients in the other,
//! the real daemon with a policy in between. What the policy decides on a request, the
//! kernel enforces on the client's next packets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly, with their location"
)]

use std::time::{Duration, Instant};

use apimon_tests::{
    daemon::{Daemon, DaemonPaths, EventStream, METRICS_ADDR, metric},
    eventually,
    netns::Topology,
    nginx::{Nginx, try_curl},
    require_root,
};
use serde_json::Value;

const POLICY: &str = r#"
[policy]
block_ttl = "3s"

[policy.escalation]
factor = 2
max_ttl = "1m"

[[policy.rules]]
id = "a-limit"
name = "Too many requests to /a"
action = "block"
severity = 6
match.path = { prefix = "/a" }
rate_limit = { requests = 3, per = "1m", key = "ip" }

[[policy.rules]]
id = "watch-b"
name = "Would block /b"
action = "block"
dry_run = true
match.path = "/b"
"#;

// Fields drop in order: the event stream goes before the daemon it follows.
struct Setup {
    events: EventStream,
    daemon: Daemon,
    _nginx: Nginx,
    topo: Topology,
}

impl Setup {
    fn new(policy: &str) -> Self {
        require_root();
        let topo = Topology::new();
        let nginx = Nginx::start(&topo.server, &["10.77.0.1:8080", "[fd00:77::1]:8080"]);
        let mut paths = DaemonPaths::new();
        paths.metrics_addr = METRICS_ADDR.into();
        std::fs::write(paths.config_file(), policy).unwrap();
        let daemon = Daemon::start_with(&topo.server, &topo.server_if, paths);
        let events = daemon.follow_events(false);
        Self {
            events,
            daemon,
            _nginx: nginx,
            topo,
        }
    }

    /// A GET from `source` (one of the client namespace's addresses); false when it
    /// could not complete within a second.
    fn get(&self, source: &str, path: &str) -> bool {
        self.request(source, path, &[])
    }

    /// A request with more curl arguments (`--data`, `-H`...).
    fn request(&self, source: &str, path: &str, extra: &[&str]) -> bool {
        let url = if source.contains(':') {
            format!("http://[fd00:77::1]:8080{path}")
        } else {
            format!("http://10.77.0.1:8080{path}")
        };
        let mut args = vec!["-g", "-o", "/dev/null", "--interface", source];
        args.extend_from_slice(extra);
        args.push(&url);
        try_curl(&self.topo.client, "1", &args).is_ok()
    }

    fn events_where(&self, action: &str) -> Vec<Value> {
        self.events
            .events()
            .into_iter()
            .filter(|e| e["event"]["action"] == action)
            .collect()
    }

    /// Waits up to 5 s for at least `count` events of `action`; fails without them.
    fn wait_event(&self, action: &str, count: usize) -> Vec<Value> {
        self.events.wait_for(Duration::from_secs(5), |events| {
            events
                .iter()
                .filter(|e| e["event"]["action"] == action)
                .count()
                >= count
        });
        let events = self.events_where(action);
        assert!(
            events.len() >= count,
            "{count} {action} events expected, got {events:?}"
        );
        events
    }

    /// Waits up to 5 s for the detection of `rule`; fails without it.
    fn wait_detection(&self, rule: &str) -> Value {
        let detection = |e: &Value| e["event"]["action"] == "detection" && e["rule"]["id"] == rule;
        let events = self.events.wait_for(Duration::from_secs(5), |events| {
            events.iter().any(detection)
        });
        events
            .into_iter()
            .find(detection)
            .unwrap_or_else(|| panic!("no detection of {rule}"))
    }

    fn decisions(&self, rule: &str, action: &str) -> f64 {
        let text = self.daemon.scrape();
        let series =
            format!("apimon_policy_decisions_total{{action=\"{action}\",rule=\"{rule}\"}}");
        metric(&text, &series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }

    fn blocked(&self) -> Vec<Value> {
        self.daemon
            .cli_json(&["block", "ls"])
            .as_array()
            .unwrap()
            .clone()
    }
}

/// Seconds between an entry's creation and expiry.
fn ttl_of(entry: &Value) -> i64 {
    let seconds = |field: &str| {
        let text = entry[field].as_str().unwrap();
        humantime::parse_rfc3339(text)
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    seconds("expires_at") - seconds("created_at")
}

#[test]
fn a_client_over_its_limit_is_blocked_in_the_kernel_and_escalates() {
    let s = Setup::new(POLICY);
    let (a, b) = ("10.77.0.2", "10.77.0.3");
    for _ in 0..3 {
        assert!(s.get(a, "/a"), "within the limit");
    }
    // The 4th request is over the limit: it may still be answered, the next cannot.
    let violation = Instant::now();
    s.get(a, "/a");
    let block = s.wait_event("block_added", 1);
    assert_eq!(block[0]["apimon"]["cidr"], "10.77.0.2/32", "{block:?}");
    assert_eq!(block[0]["apimon"]["origin"], "policy:a-limit");
    assert!(!s.get(a, "/a"), "blocked in the kernel");
    assert!(!s.get(a, "/b"), "every request, not only the limited route");
    assert!(s.get(b, "/a"), "another client is unaffected");
    let limited = s.wait_event("rate_limited", 1);
    assert_eq!(limited[0]["rule"]["id"], "a-limit");
    assert_eq!(limited[0]["source"]["ip"], "10.77.0.2");
    assert_eq!(limited[0]["url"]["path"], "/a");
    assert_eq!(limited[0]["event"]["kind"], "alert");
    assert_eq!(limited[0]["event"]["severity"], 6);
    assert_eq!(s.decisions("a-limit", "block"), 1.0);
    let first = s.blocked();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(ttl_of(&first[0]), 3, "{first:?}");
    assert_eq!(limited[0]["apimon"]["offence"], 1);
    // Written to the state file shortly after (not once per verdict), so it survives
    // a restart.
    let state = s.daemon.paths.state_dir.join("lists.json");
    eventually(
        Duration::from_secs(3),
        || "policy block never saved".into(),
        || {
            std::fs::read_to_string(&state)
                .unwrap_or_default()
                .contains("10.77.0.2/32")
        },
    );

    // The block ends by itself; the client is still over its limit, so its next
    // request is a second offence: blocked twice as long.
    eventually(
        Duration::from_secs(6),
        || "the 3 s block must end".into(),
        || s.get(a, "/b"),
    );
    assert!(violation.elapsed() >= Duration::from_secs(3));
    s.get(a, "/a");
    s.wait_event("block_added", 2);
    let offences = s.wait_event("rate_limited", 2);
    let second = &offences[offences.len() - 1];
    assert_eq!(second["apimon"]["offence"], 2, "{second}");
    assert_eq!(second["apimon"]["ttl_s"], 6, "escalated: {second}");
    let listed = s.blocked();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let expires = humantime::parse_rfc3339(listed[0]["expires_at"].as_str().unwrap()).unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(left > Duration::from_secs(4), "{listed:?}");
    assert!(!s.get(a, "/b"));
    assert_eq!(s.decisions("a-limit", "block"), 2.0);
}

#[test]
fn a_policy_block_the_operator_lifts_is_made_again_at_the_next_offence() {
    // A long block: lifted by hand, not by its end.
    let s = Setup::new(&POLICY.replace("block_ttl = \"3s\"", "block_ttl = \"1m\""));
    let a = "10.77.0.2";
    for _ in 0..4 {
        s.get(a, "/a");
    }
    s.wait_event("block_added", 1);
    assert!(!s.get(a, "/a"), "blocked in the kernel");
    s.daemon.cli_ok(&["block", "rm", "10.77.0.2/32"]);
    assert!(s.get(a, "/b"), "unblocked by the operator");
    // Still over its limit: its next requests are offences, and the verdict layer
    // must not take the lifted block for one still in force.
    eventually(
        Duration::from_secs(10),
        || {
            format!(
                "the lifted block was never made again: {:?}",
                s.events_where("rate_limited")
            )
        },
        || {
            if s.events_where("block_added").len() >= 2 {
                return true;
            }
            s.get(a, "/a");
            false
        },
    );
    assert!(!s.get(a, "/b"), "blocked again in the kernel");
    let offences = s.wait_event("rate_limited", 2);
    assert_eq!(offences[offences.len() - 1]["apimon"]["offence"], 2);
}

#[test]
fn a_dry_run_rule_only_records() {
    let s = Setup::new(POLICY);
    for _ in 0..3 {
        assert!(s.get("10.77.0.2", "/b"), "dry run never blocks");
    }
    let matches = s.wait_event("rule_match", 3);
    assert_eq!(matches.len(), 3);
    assert!(matches.iter().all(|e| e["rule"]["id"] == "watch-b"
        && e["apimon"]["action"] == "would_block"
        && e["apimon"]["dry_run"] == true));
    assert_eq!(s.decisions("watch-b", "would_block"), 3.0);
    assert!(s.blocked().is_empty());
    assert!(s.events_where("block_added").is_empty());
}

#[test]
fn ipv6_offenders_are_blocked_by_their_64() {
    let s = Setup::new(POLICY);
    for _ in 0..3 {
        assert!(s.get("fd00:77::2", "/a"));
    }
    s.get("fd00:77::2", "/a");
    let block = s.wait_event("block_added", 1);
    assert_eq!(block[0]["apimon"]["cidr"], "fd00:77::/64", "{block:?}");
    assert!(!s.get("fd00:77::2", "/b"));
    assert!(!s.get("fd00:77::3", "/b"), "the whole /64");
    assert!(s.get("10.77.0.3", "/b"), "IPv4 clients are not in it");
}

#[test]
fn reload_keeps_limiter_state_and_refuses_a_broken_policy() {
    let s = Setup::new(POLICY);
    let b = "10.77.0.3";
    for _ in 0..2 {
        assert!(s.get(b, "/a"));
    }
    // An unchanged rule keeps its count across reloads, by SIGHUP and by the CLI.
    s.daemon.signal(nix::sys::signal::Signal::SIGHUP);
    assert_eq!(s.wait_event("policy_reloaded", 1).len(), 1);
    let out = s.daemon.cli_ok(&["policy", "reload"]);
    assert!(out.contains("2 rules"), "{out}");
    assert_eq!(s.wait_event("policy_reloaded", 2).len(), 2);
    assert!(s.get(b, "/a"), "3rd request: still within the limit");
    s.get(b, "/a");
    s.wait_event("block_added", 1);
    assert!(
        !s.get(b, "/b"),
        "4th request over the limit across the reload"
    );

    // A broken policy is refused with its place; the running one stays.
    let broken = POLICY.replace("{ prefix = \"/a\" }", "{ regex = \"(\" }");
    std::fs::write(s.daemon.paths.config_file(), &broken).unwrap();
    let output = s.daemon.cli(&["policy", "reload"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let line = broken.lines().position(|l| l.contains("regex")).unwrap() + 1;
    assert!(
        stderr.contains(&format!("apimon.toml:{line}:14: invalid regex")),
        "{stderr}"
    );
    let shown = s.daemon.cli_ok(&["policy", "show"]);
    assert!(shown.contains("prefix = \"/a\""), "{shown}");
    let status = s.daemon.cli_json(&["status"]);
    assert_eq!(status["policy"]["rules"], 2, "{status}");
    // Offline check names the same place, exit 2.
    let check = s.daemon.cli(&[
        "policy",
        "check",
        &s.daemon.paths.config_file().display().to_string(),
    ]);
    assert_eq!(check.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&check.stderr).contains(&format!(":{line}:14: invalid regex")));
    std::fs::write(s.daemon.paths.config_file(), POLICY).unwrap();
    let check = s.daemon.cli(&[
        "policy",
        "check",
        &s.daemon.paths.config_file().display().to_string(),
    ]);
    assert!(check.status.success());
}

const THROTTLE_POLICY: &str = r#"
[[policy.rules]]
id = "slow-down"
action = "throttle"
throttle_pps = 20
ttl = "1m"
match.path = "/a"
rate_limit = { requests = 1, per = "1m" }
"#;

/// Sends `count` UDP datagrams from `source` to the server as fast as it can, spread
/// over about `over`.
fn udp_flood(s: &Setup, source: &str, count: u32, over: Duration) {
    let source: std::net::IpAddr = source.parse().unwrap();
    s.topo.client.run(move || {
        let socket = std::net::UdpSocket::bind((source, 0)).unwrap();
        let pause = over / count;
        for _ in 0..count {
            let _ = socket.send_to(b"x", ("10.77.0.1", 9));
            std::thread::sleep(pause);
        }
    });
}

/// (packets, drops) the kernel counted for `ip`.
fn seen(s: &Setup, ip: &str) -> (u64, u64) {
    let top = s.daemon.cli_json(&["top", "--limit", "100"]);
    top.as_array()
        .unwrap()
        .iter()
        .find(|row| row["ip"] == ip)
        .map_or((0, 0), |row| {
            (
                row["packets"].as_u64().unwrap(),
                row["drops"].as_u64().unwrap(),
            )
        })
}

#[test]
fn throttle_holds_a_client_near_its_packet_rate() {
    let s = Setup::new(THROTTLE_POLICY);
    let (a, b) = ("10.77.0.2", "10.77.0.3");
    assert!(s.get(a, "/a"));
    s.get(a, "/a");
    let throttled = s.wait_event("throttle_added", 1);
    assert_eq!(
        throttled[0]["apimon"]["cidr"], "10.77.0.2/32",
        "{throttled:?}"
    );
    assert_eq!(throttled[0]["apimon"]["rate_pps"], 20);
    assert_eq!(s.decisions("slow-down", "throttle"), 1.0);

    // 600 packets over 2 s (300/s) against a limit of 20/s (burst 20): about 60 pass.
    let (packets_before, drops_before) = seen(&s, a);
    udp_flood(&s, a, 600, Duration::from_secs(2));
    let (packets, drops) = seen(&s, a);
    let (packets, drops) = (packets - packets_before, drops - drops_before);
    let passed = packets - drops;
    assert!(packets >= 590, "the kernel saw {packets}");
    assert!((20..=120).contains(&passed), "{passed} of {packets} passed");
    let stats = s.daemon.cli_json(&["stats"]);
    assert!(stats["packets"]["drop_ratelimit"].as_u64().unwrap() >= drops);

    // Another client is not throttled.
    let (b_before, b_drops_before) = seen(&s, b);
    udp_flood(&s, b, 200, Duration::from_millis(500));
    let (b_packets, b_drops) = seen(&s, b);
    assert!(b_packets - b_before >= 195);
    assert_eq!(b_drops, b_drops_before);
}

const DETECTIONS: &str = r#"
[policy]
block_ttl = "1m"

[policy.detections]
anomaly_action = "alert"

[policy.detections.rules.sqli]
action = "block"

[[policy.detections.routes]]
route = "/notes"
off = ["xss"]
"#;

#[test]
fn an_attack_is_blocked_in_the_kernel_and_audited_with_its_rule_and_category() {
    let s = Setup::new(DETECTIONS);
    let (attacker, user) = ("10.77.0.2", "10.77.0.3");
    let post_json = |path: &str, body: &str| {
        s.request(
            user,
            path,
            &["-H", "Content-Type: application/json", "--data", body],
        )
    };
    // Ordinary traffic, and markup where the route allows it, find nothing.
    assert!(s.get(user, "/search?q=O%27Brien+%22rock+%27n%27+roll%22"));
    assert!(s.get(user, "/notes?body=%3Cscript%3Ealert(1)%3C/script%3E"));
    // An SSRF attempt in a JSON body: detected and alerted, not blocked.
    assert!(post_json(
        "/hooks",
        r#"{"name":"ci","webhook_url":"http://169.254.169.254/latest/meta-data/"}"#
    ));
    let detections = s.wait_event("detection", 2);
    let rules: Vec<&str> = detections
        .iter()
        .map(|e| e["rule"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        rules,
        ["ssrf-cloud-metadata", "anomaly-score"],
        "{detections:?}"
    );
    assert_eq!(detections[0]["rule"]["category"], "API7:2023");
    assert_eq!(
        detections[0]["apimon"]["detection"]["location"],
        "json:webhook_url"
    );
    assert_eq!(detections[1]["apimon"]["action"], "alert");
    assert!(s.get(user, "/"), "an alert does not block");
    // The same again within the report window: counted, not reported again.
    assert!(post_json(
        "/hooks",
        r#"{"webhook_url":"http://[::ffff:169.254.169.254]/"}"#
    ));
    // The markup allowed on /notes is XSS elsewhere.
    assert!(s.get(user, "/comments?body=%3Cscript%3Ealert(1)%3C/script%3E"));
    assert_eq!(s.wait_detection("xss")["url"]["path"], "/comments");

    // A request-smuggling sign from a raw socket: the parser refuses it, detections
    // name it.
    let answered = s.topo.client.run(|| {
        use std::io::{Read, Write};
        let server = "10.77.0.1:8080".parse().unwrap();
        let mut socket = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(1)).unwrap();
        socket
            .write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde")
            .unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut answer = [0u8; 64];
        socket.read(&mut answer).unwrap_or(0)
    });
    assert!(answered > 0, "nginx answers it (with a 400)");
    let refused = s.wait_detection("http-content-length");
    assert_eq!(refused["rule"]["category"], "API8:2023");
    assert!(
        refused["source"]["ip"]
            .as_str()
            .unwrap()
            .starts_with("10.77.0."),
        "{refused}"
    );

    // SQL injection: blocked at once, in the kernel.
    s.get(attacker, "/search?q=1%27%20OR%20%271%27%3D%271");
    let block = s.wait_event("block_added", 1);
    assert_eq!(block[0]["apimon"]["cidr"], "10.77.0.2/32", "{block:?}");
    assert_eq!(block[0]["apimon"]["origin"], "policy:sqli");
    assert!(!s.get(attacker, "/"), "blocked in the kernel");
    assert!(s.get(user, "/"), "others unaffected");
    let sqli = s.wait_detection("sqli");
    assert_eq!(sqli["rule"]["category"], "API8:2023");
    assert_eq!(sqli["source"]["ip"], "10.77.0.2");
    assert_eq!(sqli["url"]["path"], "/search");
    assert_eq!(sqli["apimon"]["action"], "block");
    assert_eq!(sqli["apimon"]["detection"]["evidence"], "1' OR '1'='1");
    assert_eq!(sqli["http"]["response"]["status_code"], 404);
    let text = s.daemon.scrape();
    assert_eq!(
        metric(
            &text,
            "apimon_detections_total{category=\"API8:2023\",rule=\"sqli\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "apimon_detections_total{category=\"API7:2023\",rule=\"ssrf-cloud-metadata\"}"
        ),
        Some(2.0),
        "both counted"
    );
    assert_eq!(
        s.events_where("detection")
            .iter()
            .filter(|e| e["rule"]["id"] == "ssrf-cloud-metadata")
            .count(),
        1,
        "one event per rule and client per window"
    );
    assert_eq!(
        metric(
            &text,
            "apimon_detections_total{category=\"API8:2023\",rule=\"xss\"}"
        ),
        Some(1.0),
        "from /comments only: off on /notes"
    );

    // The audit log has the detection with its rule and category.
    let audit = s.daemon.paths.dir.path().join("audit.jsonl");
    let mut audited = None;
    eventually(
        Duration::from_secs(5),
        || "no audited detection".into(),
        || {
            // Lines are read leniently: the daemon may be writing the last one.
            audited = std::fs::read_to_string(&audit)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|e| e["event"]["action"] == "detection" && e["rule"]["id"] == "sqli");
            audited.is_some()
        },
    );
    let audited = audited.unwrap();
    assert_eq!(audited["rule"]["category"], "API8:2023");
    assert_eq!(audited["event"]["kind"], "alert");

    // A detection setting that names no rule is refused, by check and by reload.
    let config = s.daemon.paths.config_file();
    std::fs::write(
        &config,
        DETECTIONS.replace("rules.sqli]", "rules.sqlinjection]"),
    )
    .unwrap();
    for args in [
        vec!["policy", "check", config.to_str().unwrap()],
        vec!["policy", "reload"],
    ] {
        let output = s.daemon.cli(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("unknown detection rule \"sqlinjection\""),
            "{stderr}"
        );
    }
}
