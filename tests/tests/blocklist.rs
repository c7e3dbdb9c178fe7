//! The real daemon on a veth pair between two network namespaces, with a real TCP
//! server and real clients: what an operator sees when blocking and allowing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly, with their location"
)]

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use apimon_tests::{
    daemon::{Daemon, DaemonPaths, json_lines},
    eventually,
    netns::Topology,
    probe::{Client, EchoServer},
    require_root,
};
use serde_json::Value;

const PORT: u16 = 8080;
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

struct Setup {
    daemon: Daemon,
    _servers: [EchoServer; 2],
    topo: Topology,
}

impl Setup {
    fn new() -> Self {
        Self::with_run_args(&[])
    }

    fn with_run_args(run_args: &[&str]) -> Self {
        require_root();
        let topo = Topology::new();
        let servers = [
            EchoServer::start(
                &topo.server,
                SocketAddr::new(IpAddr::V4(Topology::SERVER_V4), PORT),
            ),
            EchoServer::start(
                &topo.server,
                SocketAddr::new(IpAddr::V6(Topology::SERVER_V6), PORT),
            ),
        ];
        let mut paths = DaemonPaths::new();
        paths.run_args = run_args.iter().map(|a| (*a).to_owned()).collect();
        let daemon = Daemon::start_with(&topo.server, &topo.server_if, paths);
        Self {
            daemon,
            _servers: servers,
            topo,
        }
    }

    fn client(&self, source: impl Into<IpAddr>) -> Client {
        Client::new(&self.topo.client, source.into())
    }

    fn server_for(source: IpAddr) -> SocketAddr {
        match source {
            IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Topology::SERVER_V4), PORT),
            IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Topology::SERVER_V6), PORT),
        }
    }

    fn reaches(&self, client: &Client) -> bool {
        client.exchange(Self::server_for(client.source), PROBE_TIMEOUT)
    }

    /// Waits (bounded) for the client's traffic to pass again; IPv6 needs neighbour
    /// discovery to recover after a block, so a single probe is not enough.
    fn reaches_soon(&self, client: &Client) -> bool {
        client
            .wait_until(
                Self::server_for(client.source),
                true,
                Duration::from_secs(5),
            )
            .is_some()
    }
}

/// Blocks `blocked` while probing it continuously; returns how long after `block add`
/// started its traffic last got through. Also checks `other` is unaffected.
fn block_and_measure(setup: &Setup, blocked: IpAddr, other: IpAddr) -> Duration {
    let blocked_client = setup.client(blocked);
    let other_client = setup.client(other);
    assert!(
        setup.reaches_soon(&blocked_client),
        "{blocked} must reach the server before the block"
    );
    assert!(
        setup.reaches_soon(&other_client),
        "{other} must reach the server before the block"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        let client = setup.client(blocked);
        let server = Setup::server_for(blocked);
        std::thread::spawn(move || {
            let mut successes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if client.exchange(server, Duration::from_millis(50)) {
                    successes.push(started);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            successes
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    setup
        .daemon
        .cli_ok(&["block", "add", &blocked.to_string(), "--reason", "test"]);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let successes = prober.join().expect("prober");
    assert!(
        successes.iter().any(|s| *s < t0),
        "the prober saw no traffic before the block"
    );
    let last_success = successes
        .iter()
        .filter(|s| **s >= t0)
        .map(|s| s.duration_since(t0))
        .max()
        .unwrap_or_default();

    assert!(
        !setup.reaches(&blocked_client),
        "{blocked} still reaches the server after block add"
    );
    assert!(
        setup.reaches(&other_client),
        "{other} must still get through"
    );
    last_success
}

/// A `--ttl 2s` block added at `added` must end by itself: not early, not much late.
fn assert_ttl_block_ended(client: &Client, added: Instant) {
    let passed_after = client
        .wait_until(
            Setup::server_for(client.source),
            true,
            Duration::from_secs(8),
        )
        .map(|_| added.elapsed())
        .expect("a 2s block must end by itself within 8s");
    assert!(
        passed_after >= Duration::from_millis(1500),
        "ended early: {passed_after:?}"
    );
}

fn json_array(value: &Value) -> &Vec<Value> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected a JSON array: {value}"))
}

fn find_cidr<'a>(list: &'a Value, cidr: &str) -> Option<&'a Value> {
    json_array(list).iter().find(|e| e["cidr"] == cidr)
}

#[test]
fn top_counts_traffic_per_client_ip() {
    let setup = Setup::new();
    let client = setup.client(Topology::CLIENT_V4[0]);
    for _ in 0..5 {
        assert!(setup.reaches_soon(&client));
    }
    let top = setup
        .daemon
        .cli_json(&["top", "--by", "packets", "--limit", "50"]);
    let row = json_array(&top)
        .iter()
        .find(|row| row["ip"] == Topology::CLIENT_V4[0].to_string())
        .unwrap_or_else(|| panic!("client missing from top: {top}"));
    // 5 exchanges: each at least SYN, ACK, data, FIN-ish: well over 10 packets.
    assert!(row["packets"].as_u64().unwrap() >= 15, "{row}");
    assert!(row["bytes"].as_u64().unwrap() >= 15 * 54, "{row}");
    assert_eq!(row["drops"], 0);
    assert!(row["last_seen"].as_str().unwrap().ends_with('Z'), "{row}");
    for key in ["ip", "packets", "bytes", "drops", "last_seen"] {
        assert!(row.get(key).is_some(), "top rows carry {key}: {row}");
    }
    // Sorted by packets, descending.
    let packets: Vec<u64> = json_array(&top)
        .iter()
        .map(|r| r["packets"].as_u64().unwrap())
        .collect();
    assert!(packets.windows(2).all(|w| w[0] >= w[1]), "{packets:?}");

    let stats = setup.daemon.cli_json(&["stats"]);
    assert!(stats["packets"]["pass"].as_u64().unwrap() >= 15, "{stats}");
    assert!(stats["bytes"]["pass"].as_u64().unwrap() > 0, "{stats}");
    for action in [
        "pass",
        "drop_blocklist",
        "drop_ratelimit",
        "drop_policy",
        "malformed",
    ] {
        assert!(
            stats["packets"].get(action).is_some(),
            "stats lacks {action}: {stats}"
        );
    }
    assert_eq!(stats["samples"]["lost"], 0);
    assert_eq!(stats["blocklist_entries"], 0);
}

#[test]
fn ipv4_block_stops_traffic_within_100ms_and_rm_restores_it() {
    let setup = Setup::new();
    let blocked = IpAddr::V4(Topology::CLIENT_V4[0]);
    let last = block_and_measure(&setup, blocked, IpAddr::V4(Topology::CLIENT_V4[1]));
    assert!(
        last < Duration::from_millis(100),
        "traffic still passed {last:?} after block add"
    );

    let ls = setup.daemon.cli_json(&["block", "ls"]);
    let entry = find_cidr(&ls, "10.77.0.2/32").unwrap_or_else(|| panic!("{ls}"));
    assert!(entry["hits"].as_u64().unwrap() > 0, "{entry}");
    assert_eq!(entry["origin"], "cli");
    assert_eq!(entry["reason"], "test");
    assert_eq!(entry["expires_at"], Value::Null);

    let top = setup
        .daemon
        .cli_json(&["top", "--by", "drops", "--limit", "1"]);
    assert_eq!(json_array(&top)[0]["ip"], "10.77.0.2", "{top}");
    assert!(
        setup.daemon.cli_json(&["stats"])["packets"]["drop_blocklist"]
            .as_u64()
            .unwrap()
            > 0
    );

    setup.daemon.cli_ok(&["block", "rm", "10.77.0.2"]);
    assert!(
        setup.reaches_soon(&setup.client(blocked)),
        "block rm must restore traffic"
    );
    assert!(find_cidr(&setup.daemon.cli_json(&["block", "ls"]), "10.77.0.2/32").is_none());
}

#[test]
fn the_tc_ingress_hook_blocks_and_counts_like_xdp() {
    let setup = Setup::with_run_args(&["--ingress-hook", "tc"]);
    let status = setup.daemon.cli_json(&["status"]);
    assert_eq!(status["interfaces"][0]["mode"], "tc-ingress", "{status}");
    for (blocked, other) in [
        (Topology::CLIENT_V4[0].into(), Topology::CLIENT_V4[1].into()),
        (Topology::CLIENT_V6[0].into(), Topology::CLIENT_V6[1].into()),
    ] {
        let last = block_and_measure(&setup, blocked, other);
        assert!(
            last < Duration::from_millis(100),
            "{blocked} passed {last:?} after block add"
        );
    }
    let top = setup.daemon.cli_json(&["top", "--by", "drops"]);
    let dropped: Vec<&str> = json_array(&top)
        .iter()
        .filter(|row| row["drops"].as_u64().unwrap_or(0) > 0)
        .filter_map(|row| row["ip"].as_str())
        .collect();
    assert!(
        dropped.contains(&"10.77.0.2") && dropped.contains(&"fd00:77::2"),
        "{top}"
    );
    let stats = setup.daemon.cli_json(&["stats"]);
    assert!(
        stats["packets"]["drop_blocklist"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(stats["bytes"]["pass"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn switching_the_ingress_hook_after_a_crash_leaves_one_datapath() {
    let mut setup = Setup::new();
    let xdp_attached = |setup: &Setup| {
        let out = std::process::Command::new("ip")
            .args([
                "-n",
                &setup.topo.server.name,
                "link",
                "show",
                &setup.topo.server_if,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    };
    assert!(xdp_attached(&setup));
    // A crash leaves the XDP link pinned and enforcing; the next daemon runs at TC.
    setup.daemon.kill();
    assert!(xdp_attached(&setup), "pinned XDP outlives the process");
    setup.daemon.paths.run_args = vec!["--ingress-hook".into(), "tc".into()];
    setup.daemon.spawn();
    assert!(!xdp_attached(&setup), "the old hook's link must go");
    // Each packet is counted once: apimon's count moves exactly with the interface's.
    let client = setup.client(Topology::CLIENT_V4[0]);
    assert!(setup.reaches_soon(&client));
    let counted_once = (0..3).any(|_| {
        let (rx_before, seen_before) = (rx_packets(&setup), seen_packets(&setup));
        assert!(setup.reaches(&client));
        std::thread::sleep(Duration::from_millis(100));
        let (rx, seen) = (
            rx_packets(&setup) - rx_before,
            seen_packets(&setup) - seen_before,
        );
        assert!(rx > 0);
        rx == seen
    });
    assert!(
        counted_once,
        "apimon and the interface disagree on packets received"
    );
}

/// Packets the server's interface received (its own counter).
fn rx_packets(setup: &Setup) -> u64 {
    let path = format!(
        "/sys/class/net/{}/statistics/rx_packets",
        setup.topo.server_if
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &setup.topo.server.name, "cat", &path])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Packets apimon's ingress counted, whatever their fate.
fn seen_packets(setup: &Setup) -> u64 {
    let stats = setup.daemon.cli_json(&["stats"]);
    stats["packets"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum()
}

#[test]
fn ipv6_block_stops_traffic_within_100ms_and_rm_restores_it() {
    let setup = Setup::new();
    let blocked = IpAddr::V6(Topology::CLIENT_V6[0]);
    let last = block_and_measure(&setup, blocked, IpAddr::V6(Topology::CLIENT_V6[1]));
    assert!(
        last < Duration::from_millis(100),
        "traffic still passed {last:?} after block add"
    );
    setup.daemon.cli_ok(&["block", "rm", &blocked.to_string()]);
    assert!(
        setup.reaches_soon(&setup.client(blocked)),
        "block rm must restore IPv6 traffic"
    );
}

#[test]
fn a_prefix_block_covers_every_address_in_it() {
    let setup = Setup::new();
    let clients = [
        setup.client(Topology::CLIENT_V6[0]),
        setup.client(Topology::CLIENT_V6[1]),
    ];
    for client in &clients {
        assert!(setup.reaches_soon(client));
    }
    setup.daemon.cli_ok(&["block", "add", "fd00:77::/64"]);
    for client in &clients {
        assert!(
            !setup.reaches(client),
            "{} passed a /64 block",
            client.source
        );
    }
    // Still reachable over IPv4: the prefix is IPv6 only.
    assert!(setup.reaches_soon(&setup.client(Topology::CLIENT_V4[0])));
}

#[test]
fn a_ttl_block_ends_by_itself() {
    let setup = Setup::new();
    let client = setup.client(Topology::CLIENT_V4[0]);
    assert!(setup.reaches_soon(&client));
    let added = Instant::now();
    let out = setup
        .daemon
        .cli_ok(&["block", "add", "10.77.0.2", "--ttl", "2s"]);
    assert!(out.contains("until"), "{out}");
    assert!(!setup.reaches(&client), "a ttl block must drop at once");
    let entry = find_cidr(&setup.daemon.cli_json(&["block", "ls"]), "10.77.0.2/32")
        .cloned()
        .expect("listed");
    assert!(entry["expires_at"].is_string(), "{entry}");
    assert_ttl_block_ended(&client, added);
    // The daemon tidies the expired entry away.
    eventually(
        Duration::from_secs(3),
        || "expired entry still listed".into(),
        || find_cidr(&setup.daemon.cli_json(&["block", "ls"]), "10.77.0.2/32").is_none(),
    );
    // Operators see the whole story in `apimon events`.
    let lines = setup.daemon.cli_ok(&["events", "--json"]);
    let actions: Vec<String> = json_lines(&lines)
        .into_iter()
        .filter(|event| event["apimon"]["cidr"] == "10.77.0.2/32")
        .map(|event| {
            event["event"]["action"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(actions, ["block_added", "block_expired"], "{lines}");
    let human = setup.daemon.cli_ok(&["events"]);
    assert!(
        human
            .lines()
            .any(|l| l.contains("block_expired") && l.contains("cidr=10.77.0.2/32")),
        "{human}"
    );
}

#[test]
fn a_ttl_block_ends_on_time_while_the_daemon_is_down() {
    let mut setup = Setup::new();
    let client = setup.client(Topology::CLIENT_V4[0]);
    assert!(setup.reaches_soon(&client));
    setup
        .daemon
        .cli_ok(&["block", "add", "10.77.0.2", "--ttl", "2s"]);
    let added = Instant::now();
    setup.daemon.kill();
    assert!(
        !setup.reaches(&client),
        "the kernel keeps enforcing after the daemon died"
    );
    assert_ttl_block_ended(&client, added);
}

/// The kernel sees only the longest matching prefix, so a nested prefix must carry the
/// deadline of the permanent prefix around it.
#[test]
fn a_permanent_prefix_outlives_a_nested_ttl_prefix() {
    let setup = Setup::new();
    let client = setup.client(Topology::CLIENT_V4[0]);
    assert!(setup.reaches_soon(&client));
    setup.daemon.cli_ok(&["block", "add", "10.77.0.0/24"]);
    setup
        .daemon
        .cli_ok(&["block", "add", "10.77.0.0/25", "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(find_cidr(&setup.daemon.cli_json(&["block", "ls"]), "10.77.0.0/25").is_none());
    assert!(
        !setup.reaches(&client),
        "the /24 still blocks after the nested /25 expired"
    );
    setup.daemon.cli_ok(&["block", "rm", "10.77.0.0/24"]);
    assert!(setup.reaches_soon(&client));
}

#[test]
fn allowlisted_addresses_are_never_dropped() {
    let setup = Setup::new();
    for client in Topology::CLIENT_V4 {
        assert!(setup.reaches_soon(&setup.client(client)));
    }
    setup
        .daemon
        .cli_ok(&["allow", "add", "10.77.0.2", "--reason", "monitoring"]);
    setup
        .daemon
        .cli_ok(&["block", "add", "10.77.0.0/24", "10.77.0.2"]);
    assert!(
        setup.reaches_soon(&setup.client(Topology::CLIENT_V4[0])),
        "allowlisted client was dropped"
    );
    assert!(
        !setup.reaches(&setup.client(Topology::CLIENT_V4[1])),
        "the /24 block must drop the other client"
    );
    let allow = setup.daemon.cli_json(&["allow", "ls"]);
    let entry = find_cidr(&allow, "10.77.0.2/32").unwrap_or_else(|| panic!("{allow}"));
    assert!(entry["hits"].as_u64().unwrap() > 0, "{entry}");
    assert_eq!(entry["reason"], "monitoring");
    setup.daemon.cli_ok(&["allow", "rm", "10.77.0.2"]);
    assert!(
        !setup.reaches(&setup.client(Topology::CLIENT_V4[0])),
        "without the allow entry the block applies"
    );
}

#[test]
fn blocks_survive_a_clean_restart() {
    let mut setup = Setup::new();
    let blocked = setup.client(Topology::CLIENT_V4[0]);
    let blocked_v6 = setup.client(Topology::CLIENT_V6[0]);
    assert!(setup.reaches_soon(&blocked));
    assert!(setup.reaches_soon(&blocked_v6));
    setup
        .daemon
        .cli_ok(&["block", "add", "10.77.0.2", "fd00:77::2"]);
    setup.daemon.stop();
    assert!(setup.daemon.log().contains("Detached XDP"));
    setup.daemon.spawn();
    assert!(
        !setup.reaches(&blocked),
        "the IPv4 block must hold after a restart"
    );
    assert!(
        !setup.reaches(&blocked_v6),
        "the IPv6 block must hold after a restart"
    );
    assert!(setup.reaches_soon(&setup.client(Topology::CLIENT_V4[1])));
    let ls = setup.daemon.cli_json(&["block", "ls"]);
    assert_eq!(json_array(&ls).len(), 2, "{ls}");
}

#[test]
fn blocks_survive_sigkill_and_hold_while_the_daemon_is_dead() {
    let mut setup = Setup::new();
    let blocked = setup.client(Topology::CLIENT_V4[0]);
    assert!(setup.reaches_soon(&blocked));
    setup.daemon.cli_ok(&["block", "add", "10.77.0.2"]);
    assert!(!setup.reaches(&blocked));
    let hits_before = find_cidr(&setup.daemon.cli_json(&["block", "ls"]), "10.77.0.2/32").unwrap()
        ["hits"]
        .as_u64()
        .unwrap();
    setup.daemon.kill();
    assert!(
        !setup.reaches(&blocked),
        "the pinned program must keep dropping while the daemon is dead"
    );
    setup.daemon.spawn();
    assert!(
        setup.daemon.log().contains("Adopted the pinned XDP link"),
        "{}",
        setup.daemon.log()
    );
    assert!(
        !setup.reaches(&blocked),
        "the block must hold after the restart"
    );
    assert!(setup.reaches_soon(&setup.client(Topology::CLIENT_V4[1])));
    let hits_after =
        find_cidr(&setup.daemon.cli_json(&["block", "ls"]), "10.77.0.2/32").unwrap()["hits"]
            .as_u64()
            .unwrap();
    assert!(
        hits_after > hits_before,
        "hit counters live in pinned maps: {hits_before} -> {hits_after}"
    );
}

#[test]
fn status_reports_the_attached_interface() {
    let setup = Setup::new();
    let status = setup.daemon.cli_json(&["status"]);
    let iface = &status["interfaces"][0];
    assert_eq!(iface["name"], setup.topo.server_if.as_str());
    assert_eq!(iface["attached"], true);
    assert!(
        ["native", "skb"].contains(&iface["mode"].as_str().unwrap()),
        "{status}"
    );
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["policy"]["source"].is_string());
    assert!(status["uptime_s"].is_u64());
}
