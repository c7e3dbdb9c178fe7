use std::path::Path;

use super::*;
use crate::http::parse::request_head;

const FULL: &str = r#"
dry_run = false
block_ttl = "15m"
throttle_ttl = "5m"
ipv6_prefix = 64

[escalation]
factor = 3
max_ttl = "1d"
memory = "12h"

[[rules]]
id = "office"
name = "The office is never limited"
action = "allow"
match.source = ["192.0.2.0/24", "2001:db8:1::/48"]

[[rules]]
id = "login-flood"
name = "Login attempts per client"
action = "block"
ttl = "2m"
severity = 7
match.method = ["POST"]
match.host = "api.example"
match.path = { prefix = "/login" }
rate_limit = { requests = 3, per = "1m", key = "ip" }

[[rules]]
id = "admin"
action = "alert"
match.path = { glob = "/admin/**" }
match.header = { "x-admin" = { present = true } }

[[rules]]
id = "debug"
action = "log"
dry_run = true
match.path = { regex = "^/v[0-9]+/debug$" }
match.query = { verbose = "yes please" }

[[rules]]
id = "key-limit"
action = "throttle"
throttle_pps = 50
match.route = "/items/{id}"
rate_limit = { requests = 2, per = "1m", key = "header:X-Api-Key", max_keys = 1000 }

[[rules]]
id = "tenant"
action = "log"
rate_limit = { requests = 1, per = "1h", key = "jwt_sub" }
"#;

fn policy(text: &str) -> Policy {
    let doc = PolicyDoc::parse(text, Path::new("p.toml")).unwrap_or_else(|e| panic!("{e}"));
    Policy::new(doc, Source::File("p.toml".into()), None).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(text: &str) -> String {
    match PolicyDoc::parse(text, Path::new("p.toml")) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn judge(policy: &Policy, source: &str, head: &str, route: &str) -> Vec<(String, &'static str)> {
    let head = request_head(head);
    policy
        .evaluate(&Request {
            source: source.parse().unwrap(),
            head: &head,
            route,
        })
        .into_iter()
        .map(|d| (d.rule_id.to_owned(), d.label()))
        .collect()
}

fn ids<'a>(decisions: &'a [(String, &'static str)]) -> Vec<&'a str> {
    decisions.iter().map(|(id, _)| id.as_str()).collect()
}

const LOGIN: &str = "POST /login/form HTTP/1.1\r\nHost: API.example:8443\r\n\r\n";

#[test]
fn every_key_parses_and_shows_back_the_same() {
    let p = policy(FULL);
    assert_eq!(p.rule_count(), 6);
    assert_eq!(p.doc.escalation.factor.get(), 3);
    assert_eq!(p.doc.block_ttl.0, Duration::from_secs(900));
    let shown = p.to_toml();
    let again = PolicyDoc::parse(&shown, Path::new("shown.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{shown}"));
    assert_eq!(
        toml::to_string(&again).unwrap(),
        toml::to_string(&p.doc).unwrap(),
        "{shown}"
    );
}

#[test]
fn errors_name_file_line_and_column() {
    let cases = [
        (
            "[[rules]]\nid = \"a\"\naction = \"explode\"\n",
            "p.toml:3:10",
            "unknown variant `explode`",
        ),
        (
            "[[rules]]\nid = \"a\"\naction = \"log\"\nmatch.path = { regex = \"(\" }\n",
            "p.toml:4:14",
            "invalid regex",
        ),
        (
            "[[rules]]\nid = \"a\"\naction = \"log\"\nmatch.source = [\"10.0.0.300\"]\n",
            "p.toml:4:16",
            "invalid CIDR",
        ),
        ("block_ttl = \"soon\"\n", "p.toml:1:13", "invalid duration"),
        ("ipv6_prefix = 200\n", "p.toml:1:15", "1..=128"),
        (
            "[[rules]]\nid = \"a\"\naction = \"log\"\nrate_limit = { requests = 0, per = \"1s\" }\n",
            "p.toml:4:",
            "nonzero",
        ),
        (
            "[[rules]]\nid = \"a\"\naction = \"log\"\nrate_limit = { requests = 1, per = \"1s\", key = \"cookie\" }\n",
            "p.toml:4:",
            "invalid rate limit key",
        ),
        (
            "[[rules]]\nid = \"a\"\naction = \"log\"\nmatch.colour = \"red\"\n",
            "p.toml:4:",
            "unknown field `colour`",
        ),
        (
            "[[rules]]\nid = \"a\"\naction = \"log\"\nmatch.path = { prefix = \"/a\", glob = \"/b\" }\n",
            "p.toml:4:",
            "exactly one of",
        ),
        (
            "[[rules]]\nid = \"a\"\naction = \"throttle\"\n",
            "p.toml:2:6",
            "needs throttle_pps",
        ),
        (
            "[[rules]]\nid = \"a\"\naction = \"log\"\n[[rules]]\nid = \"a\"\naction = \"log\"\n",
            "p.toml:5:6",
            "duplicate rule id",
        ),
        (
            "[[rules]]\nid = \"has space\"\naction = \"log\"\n",
            "p.toml:2:6",
            "must be letters",
        ),
    ];
    for (text, place, reason) in cases {
        let message = errors(text);
        assert!(
            message.starts_with(place),
            "{message:?} should start with {place}"
        );
        assert!(
            message.contains(reason),
            "{message:?} should say {reason:?}"
        );
    }
}

#[test]
fn conditions_match_as_documented() {
    let p = policy(FULL);
    // Host compared without port and case; prefix path; method.
    assert_eq!(
        ids(&judge(&p, "10.0.0.1", LOGIN, "/login/form")),
        Vec::<&str>::new()
    );
    assert_eq!(
        ids(&judge(
            &p,
            "10.0.0.1",
            "GET /admin/users/1 HTTP/1.1\r\nX-Admin: 1\r\n\r\n",
            "/admin/users/{id}"
        )),
        ["admin"]
    );
    assert!(
        judge(
            &p,
            "10.0.0.1",
            "GET /admin/users HTTP/1.1\r\n\r\n",
            "/admin/users"
        )
        .is_empty(),
        "header must be present"
    );
    assert!(
        judge(
            &p,
            "10.0.0.1",
            "GET /adminx HTTP/1.1\r\nX-Admin: 1\r\n\r\n",
            "/adminx"
        )
        .is_empty()
    );
    // Header rules see every header the parser accepted, however many.
    let padding: String = (0..150).map(|i| format!("X-Pad-{i}: {i}\r\n")).collect();
    let crowded = format!("GET /admin/x HTTP/1.1\r\n{padding}X-Admin: 1\r\n\r\n");
    assert_eq!(ids(&judge(&p, "10.0.0.1", &crowded, "/admin/x")), ["admin"]);
    // Spellings servers resolve to the same path match the same rules.
    for target in [
        "http://api.example/admin/x",
        "//%61dmin/./x",
        "/v1/../admin/x",
    ] {
        let head = format!("GET {target} HTTP/1.1\r\nX-Admin: 1\r\n\r\n");
        assert_eq!(
            ids(&judge(&p, "10.0.0.1", &head, "/admin/x")),
            ["admin"],
            "{target}"
        );
    }
    // Regex path and a decoded query value; the rule is in dry run.
    assert_eq!(
        judge(
            &p,
            "10.0.0.1",
            "GET /v2/debug?verbose=yes+please HTTP/1.1\r\n\r\n",
            "/v2/debug"
        ),
        [("debug".to_owned(), "would_log")]
    );
    assert!(
        judge(
            &p,
            "10.0.0.1",
            "GET /v2/debug?verbose=no HTTP/1.1\r\n\r\n",
            "/v2/debug"
        )
        .is_empty()
    );
    // Allow stops evaluation for the office, also over the login limit.
    for _ in 0..5 {
        assert_eq!(
            ids(&judge(&p, "192.0.2.9", LOGIN, "/login/form")),
            ["office"]
        );
    }
}

#[test]
fn rate_limits_fire_over_the_limit_per_key() {
    let p = policy(FULL);
    for _ in 0..3 {
        assert!(judge(&p, "10.0.0.1", LOGIN, "/login/form").is_empty());
    }
    assert_eq!(
        judge(&p, "10.0.0.1", LOGIN, "/login/form"),
        [("login-flood".to_owned(), "block")]
    );
    assert!(
        judge(&p, "10.0.0.2", LOGIN, "/login/form").is_empty(),
        "per client"
    );
    // IPv6 clients share their /64's budget.
    for i in 1..=3 {
        assert!(judge(&p, &format!("2001:db8:9::{i}"), LOGIN, "/login/form").is_empty());
    }
    assert_eq!(
        ids(&judge(&p, "2001:db8:9::ffff", LOGIN, "/login/form")),
        ["login-flood"]
    );
    assert_eq!(
        p.offender_net("2001:db8:9::ffff".parse().unwrap())
            .to_string(),
        "2001:db8:9::/64"
    );
    // Keyed by API key: requests without one are not limited.
    let with_key = |key: &str| format!("GET /items/7 HTTP/1.1\r\nX-Api-Key: {key}\r\n\r\n");
    for _ in 0..2 {
        assert!(judge(&p, "10.0.0.3", &with_key("k1"), "/items/{id}").is_empty());
    }
    assert_eq!(
        judge(&p, "10.0.0.4", &with_key("k1"), "/items/{id}"),
        [("key-limit".to_owned(), "throttle")],
        "the key, not the address"
    );
    assert!(judge(&p, "10.0.0.3", &with_key("k2"), "/items/{id}").is_empty());
    for _ in 0..5 {
        assert!(
            judge(
                &p,
                "10.0.0.3",
                "GET /items/7 HTTP/1.1\r\n\r\n",
                "/items/{id}"
            )
            .is_empty()
        );
    }
    // Keyed by the JWT subject.
    let bearer = "GET /x HTTP/1.1\r\nAuthorization: Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1c2VyLTciLCJleHAiOjF9.\r\n\r\n";
    assert!(judge(&p, "10.0.0.5", bearer, "/x").is_empty());
    assert_eq!(ids(&judge(&p, "10.0.0.6", bearer, "/x")), ["tenant"]);
}

#[test]
fn a_reload_keeps_the_state_of_unchanged_limits_only() {
    let old = policy(FULL);
    for _ in 0..3 {
        assert!(judge(&old, "10.0.0.1", LOGIN, "/login/form").is_empty());
    }
    let same = Policy::new(old.doc.clone(), old.source.clone(), Some(&old)).unwrap();
    assert_eq!(
        ids(&judge(&same, "10.0.0.1", LOGIN, "/login/form")),
        ["login-flood"]
    );
    let changed_text = FULL.replace("requests = 3, per = \"1m\"", "requests = 4, per = \"1m\"");
    let changed = Policy::new(
        PolicyDoc::parse(&changed_text, Path::new("p.toml")).unwrap(),
        old.source.clone(),
        Some(&same),
    )
    .unwrap();
    assert!(
        judge(&changed, "10.0.0.1", LOGIN, "/login/form").is_empty(),
        "a changed limit starts afresh"
    );
}

#[test]
fn global_dry_run_records_only_and_the_builtin_policy_only_alerts() {
    let p = policy(&format!(
        "dry_run = true\n{}",
        FULL.trim_start().trim_start_matches("dry_run = false")
    ));
    for _ in 0..3 {
        judge(&p, "10.0.0.1", LOGIN, "/login/form");
    }
    assert_eq!(
        judge(&p, "10.0.0.1", LOGIN, "/login/form"),
        [("login-flood".to_owned(), "would_block")]
    );
    let builtin = Policy::builtin();
    assert_eq!(builtin.source, Source::Builtin);
    assert_eq!(builtin.rule_count(), 1);
    let head = "GET / HTTP/1.1\r\n\r\n";
    let fired: Vec<_> = (0..700)
        .flat_map(|_| judge(&builtin, "10.0.0.1", head, "/"))
        .collect();
    assert_eq!(fired.len(), 100);
    assert!(
        fired
            .iter()
            .all(|(id, label)| id == "builtin-client-flood" && *label == "alert")
    );
}

#[test]
fn detection_settings_parse_and_show_back_the_same() {
    let text = r#"
[detections]
paranoia = 2
anomaly_action = "block"
report_window = "30s"

[detections.rules.sqli]
action = "block"
ttl = "1h"

[detections.rules.xss]
mode = "dry_run"

[[detections.routes]]
route = "/snippets"
off = ["sqli"]

[detections.behaviour]
admin_routes = ["/admin/**"]
admin_sources = ["10.0.0.0/8"]
"#;
    let p = policy(text);
    let d = &p.detections.doc;
    assert_eq!((d.paranoia, d.anomaly_action), (2, ActionKind::Block));
    assert_eq!(d.report_window.0, Duration::from_secs(30));
    let shown = p.to_toml();
    let again = PolicyDoc::parse(&shown, Path::new("shown.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{shown}"));
    assert_eq!(again.detections, p.doc.detections, "{shown}");
    let error = PolicyDoc::parse("[detections]\nparanoid = 2", Path::new("p.toml"))
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("p.toml:2:1:"), "{error}");
}
