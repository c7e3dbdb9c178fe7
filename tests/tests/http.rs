//! The HTTP observation pipeline end to end: nginx in one namespace, curl and a raw
//! socket client in the other, the real daemon in between. What an operator scrapes
//! from /metrics must match, exactly, the requests that were sent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly, with their location"
)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use apimon_tests::{
    daemon::{Daemon, metric, metric_sum, promtool_check},
    netns::{NetNs, Topology},
    nginx::{BIG_BYTES, Nginx, body_file, curl},
    require_root,
};

const BASE: &str = "http://10.77.0.1:8080";
const HOST: &str = "10.77.0.1:8080";
const SECRET: &str = "s3cr3t-key-0xDEADBEEF";

/// What one observed request must look like, field by field.
struct Expected {
    method: &'static str,
    path: &'static str,
    query: Option<&'static str>,
    host: &'static str,
    status: u64,
    request_body: u64,
    response_body: u64,
    curl: bool,
}

fn get(path: &'static str, host: &'static str, response_body: u64, curl: bool) -> Expected {
    Expected {
        method: "GET",
        path,
        query: None,
        host,
        status: 200,
        request_body: 0,
        response_body,
        curl,
    }
}

fn post(request_body: u64) -> Expected {
    Expected {
        method: "POST",
        path: "/echo",
        query: None,
        host: HOST,
        status: 200,
        request_body,
        response_body: 3,
        curl: true,
    }
}

/// Sends raw bytes from the client namespace and reads until the server closes.
fn raw_exchange(ns: &NetNs, bytes: &'static [u8]) -> Vec<u8> {
    ns.run(move || {
        let addr: SocketAddr = "10.77.0.1:8080".parse().unwrap();
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(bytes).expect("write");
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        reply
    })
}

fn requests(text: &str, method: &str, route: &str, status: &str) -> f64 {
    let series = format!(
        "apimon_http_requests_total{{http_request_method=\"{method}\",http_response_status_code=\"{status}\",http_route=\"{route}\"}}"
    );
    metric(text, &series).unwrap_or(0.0)
}

#[test]
fn metrics_and_events_match_the_requests_sent_exactly() {
    observe_everything(&[], "native");
}

#[test]
fn the_tc_ingress_hook_observes_the_same() {
    observe_everything(&["--ingress-hook", "tc"], "tc-ingress");
}

/// Every kind of request, through the daemon started with `run_args`; the interface
/// must report `mode`.
fn observe_everything(run_args: &[&str], mode: &str) {
    require_root();
    let topo = Topology::new();
    let nginx = Nginx::start(&topo.server, &["10.77.0.1:8080", "[fd00:77::1]:8080"]);
    let daemon = Daemon::start_with_metrics(&topo.server, &topo.server_if, run_args);
    let status = daemon.cli_json(&["status"]);
    assert_eq!(status["interfaces"][0]["mode"], mode, "{status}");
    let stream = daemon.follow_events(true);
    let bodies = nginx.dir.path();

    // Keep-alive: three requests on one connection.
    curl(
        &topo.client,
        &[
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            &format!("{BASE}/a?x=1"),
            &format!("{BASE}/b"),
            &format!("{BASE}/users/42"),
        ],
    );
    // A chunked POST, and a JSON body larger than the capture budget, over many segments.
    let small = body_file(bodies, "small.json", 3000);
    let large = body_file(bodies, "large.json", 40_000);
    let post = |header: &str, body: &std::path::Path| {
        let body = format!("@{}", body.display());
        curl(
            &topo.client,
            &[
                "-o",
                "/dev/null",
                "-H",
                header,
                "--data-binary",
                &body,
                &format!("{BASE}/echo"),
            ],
        );
    };
    post("Transfer-Encoding: chunked", &small);
    post("Content-Type: application/json", &large);
    // 100-continue.
    post("Expect: 100-continue", &small);
    // A request head larger than one segment.
    let big_header = format!("X-Big: {}", "h".repeat(4000));
    curl(
        &topo.client,
        &["-o", "/dev/null", "-H", &big_header, &format!("{BASE}/b")],
    );
    // A response of several MB.
    let size = curl(
        &topo.client,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &format!("{BASE}/big"),
        ],
    );
    assert_eq!(size.trim(), BIG_BYTES.to_string());
    // IPv6.
    curl(
        &topo.client,
        &["-g", "-o", "/dev/null", "http://[fd00:77::1]:8080/a"],
    );
    // Pipelining from a raw socket.
    let reply = raw_exchange(
        &topo.client,
        b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\nGET /a HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        String::from_utf8_lossy(&reply)
            .matches("HTTP/1.1 200")
            .count(),
        3
    );
    // Not HTTP on a monitored port (a TLS ClientHello's first bytes).
    raw_exchange(
        &topo.client,
        &[
            0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03,
        ],
    );
    // A client that sends garbage after a good request.
    raw_exchange(
        &topo.client,
        b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n\x01\x02\x03 garbage\r\n\r\n",
    );
    // A credential in the query string.
    curl(
        &topo.client,
        &[
            "-o",
            "/dev/null",
            &format!("{BASE}/b?api_key={SECRET}&page=2"),
        ],
    );

    let expected = [
        ("GET", "/a", "200", 5.0),
        ("GET", "/b", "200", 4.0),
        ("GET", "/users/{id}", "200", 1.0),
        ("GET", "/big", "200", 1.0),
        ("POST", "/echo", "200", 3.0),
    ];
    let start = Instant::now();
    let text = loop {
        let text = daemon.scrape();
        let all_there = expected
            .iter()
            .all(|(method, route, status, count)| requests(&text, method, route, status) >= *count);
        if all_there || start.elapsed() > Duration::from_secs(10) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for (method, route, status, count) in expected {
        assert_eq!(
            requests(&text, method, route, status),
            count,
            "{method} {route} {status}\n{text}"
        );
    }
    let total = metric_sum(&text, "apimon_http_requests_total");
    assert_eq!(total, 14.0, "no request counted twice or invented\n{text}");
    assert_eq!(
        metric(&text, "apimon_samples_lost_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "apimon_parse_errors_total{kind=\"not_http_tls\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "apimon_parse_errors_total{kind=\"invalid_head\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(metric(&text, "apimon_samples_total{direction=\"request\"}").unwrap_or(0.0) > 0.0);
    assert!(metric(&text, "apimon_samples_total{direction=\"response\"}").unwrap_or(0.0) > 0.0);
    let stats = daemon.cli_json(&["stats"]);
    assert!(
        stats["samples"]["captured"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert_eq!(stats["samples"]["lost"], 0);
    check_events(&stream);
    assert!(
        !daemon.log().contains(SECRET),
        "the secret leaked into the log"
    );
    check_exposition(&daemon, &topo.server_if);
}

/// Kernel counters per interface and list sizes are exported, and the whole exposition
/// passes `promtool check metrics`.
fn check_exposition(daemon: &Daemon, iface: &str) {
    daemon.cli_ok(&[
        "block",
        "add",
        "192.0.2.0/24",
        "2001:db8::/32",
        "198.51.100.9",
    ]);
    let text = daemon.scrape();
    if let Err(problems) = promtool_check(&text) {
        panic!("promtool check metrics:\n{problems}\n{text}");
    }
    let counted = |name: &str| {
        metric(
            &text,
            &format!("{name}{{action=\"pass\",iface=\"{iface}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let stats = daemon.cli_json(&["stats"]);
    let packets = counted("apimon_packets_total");
    assert!(packets > 100.0, "{text}");
    assert!(
        packets <= stats["packets"]["pass"].as_f64().unwrap(),
        "a scrape before `stats` cannot see more"
    );
    // Requests and ACKs reach the server's interface; at least the 40 kB JSON body did.
    assert!(counted("apimon_bytes_total") > 40_000.0, "{text}");
    let entries = |family: &str| {
        metric(
            &text,
            &format!("apimon_blocklist_entries{{family=\"{family}\",origin=\"cli\"}}"),
        )
    };
    assert_eq!(entries("ipv4"), Some(2.0), "{text}");
    assert_eq!(entries("ipv6"), Some(1.0), "{text}");
    for name in ["apimon_samples_lost_total", "process_resident_memory_bytes"] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing\n{text}"
        );
    }
}

/// Every request the clients sent, in order, with each field as sent and answered.
fn check_events(stream: &apimon_tests::daemon::EventStream) {
    let expected = [
        Expected {
            query: Some("x=1"),
            ..get("/a", HOST, 6, true)
        },
        get("/b", HOST, 7, true),
        get("/users/42", HOST, 10, true),
        post(3000),
        post(40_000),
        post(3000),
        get("/b", HOST, 7, true),
        get("/big", HOST, BIG_BYTES as u64, true),
        get("/a", "[fd00:77::1]:8080", 6, true),
        get("/a", "t", 6, false),
        get("/b", "t", 7, false),
        get("/a", "t", 6, false),
        get("/a", "t", 6, false),
        Expected {
            query: Some("api_key="),
            ..get("/b", HOST, 7, true)
        },
    ];
    let events = stream.wait_for(Duration::from_secs(10), |events| {
        events
            .iter()
            .filter(|e| e["event"]["action"] == "http_request")
            .count()
            >= expected.len()
    });
    let requests = stream.http_requests();
    assert_eq!(
        requests.len(),
        expected.len(),
        "one event per request\n{requests:#?}"
    );
    for (i, (event, want)) in requests.iter().zip(&expected).enumerate() {
        let context = format!("request {i}: {event:#}");
        assert_eq!(event["http"]["request"]["method"], want.method, "{context}");
        assert_eq!(event["url"]["path"], want.path, "{context}");
        match want.query {
            Some(prefix) => assert!(
                event["url"]["query"]
                    .as_str()
                    .is_some_and(|q| q.starts_with(prefix)),
                "{context}"
            ),
            None => assert!(event["url"]["query"].is_null(), "{context}"),
        }
        assert_eq!(event["url"]["domain"], want.host, "{context}");
        assert_eq!(
            event["http"]["response"]["status_code"], want.status,
            "{context}"
        );
        assert_eq!(
            event["http"]["request"]["body"]["bytes"], want.request_body,
            "{context}"
        );
        assert_eq!(
            event["http"]["response"]["body"]["bytes"], want.response_body,
            "{context}"
        );
        // The kernel picks one of the client namespace's addresses.
        let source: std::net::IpAddr = event["source"]["ip"].as_str().unwrap().parse().unwrap();
        let clients: Vec<std::net::IpAddr> = if want.host.starts_with('[') {
            Topology::CLIENT_V6.map(Into::into).to_vec()
        } else {
            Topology::CLIENT_V4.map(Into::into).to_vec()
        };
        assert!(clients.contains(&source), "{context}");
        assert_eq!(event["destination"]["port"], 8080, "{context}");
        assert_eq!(
            event["user_agent"]["original"]
                .as_str()
                .is_some_and(|ua| ua.starts_with("curl/")),
            want.curl,
            "{context}"
        );
        assert!(event["event"]["duration"].as_u64().is_some(), "{context}");
    }
    // The credential is fingerprinted, never shown.
    let last = &requests[expected.len() - 1];
    let query = last["url"]["query"].as_str().unwrap_or_default();
    assert!(
        query.starts_with("api_key=hmac:") && query.ends_with("&page=2"),
        "{query}"
    );
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains(SECRET), "the secret leaked into events");
}
