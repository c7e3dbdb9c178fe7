//! The labelled detection corpus (`tests/corpus`) and its replay through the daemon's
//! own code path (segments → reassembly → HTTP parsing → detections), for
//! `cargo xtask eval` and the quality regression test.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::segments::{MSS, Stream};
use anyhow::{Context, Result, bail};
use monitor::{
    capture::Direction,
    detect::{Report, State, catalog::Class},
    http::{Event, Limits, Pipeline, route::Routes},
    policy::Policy,
};

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
const USER_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0";

/// The attack files and the class each one's payloads belong to.
const ATTACK_FILES: &[(&str, Class)] = &[
    ("sqli", Class::Sqli),
    ("xss", Class::Xss),
    ("path_traversal", Class::PathTraversal),
    ("command_injection", Class::CommandInjection),
    ("template_injection", Class::TemplateInjection),
    ("ssrf", Class::Ssrf),
    ("nosql_injection", Class::NosqlInjection),
];

/// The targets (issue 6), in percent: detection of each target class, false positives
/// of each class and of all rules together on benign traffic.
pub const DETECTION_TARGET: f64 = 95.0;
pub const FALSE_POSITIVE_TARGET: f64 = 0.5;

/// Classes with a detection target.
pub const TARGET_CLASSES: &[Class] = &[
    Class::Sqli,
    Class::Xss,
    Class::PathTraversal,
    Class::CommandInjection,
];

pub struct Case {
    /// None: benign.
    pub class: Option<Class>,
    /// How the payload was sent (`query`, `form`...), and the payload.
    pub label: String,
    pub request: Vec<u8>,
}

fn lines(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty() && !l.starts_with("# "))
        .map(str::to_owned)
        .collect())
}

/// Percent-encodes all but RFC 3986 unreserved characters.
fn percent(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// A JSON string with `<`, `>`, `&` and `'` escaped as `\u00XX` (as Go writes them).
fn json_string(text: &str) -> String {
    let plain = serde_json::Value::String(text.to_owned()).to_string();
    plain
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\'', "\\u0027")
}

fn get(target: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: {USER_AGENT}\r\nAccept: */*\r\n\r\n"
    )
    .into_bytes()
}

fn post(target: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: {USER_AGENT}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One value sent the ways an API receives it. `param` names the field.
fn placements(value: &str, param: &str, double: bool) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        (
            "query".to_owned(),
            get(&format!("/api/search?{param}={}&page=1", percent(value))),
        ),
        (
            "form".to_owned(),
            post(
                "/api/comments",
                "application/x-www-form-urlencoded",
                &format!("author=alice&{param}={}", percent(value)),
            ),
        ),
        (
            "json".to_owned(),
            post(
                "/api/items",
                "application/json",
                &format!("{{\"{param}\":{},\"count\":3}}", json_string(value)),
            ),
        ),
    ];
    if double {
        out.push((
            "query, double-encoded".to_owned(),
            get(&format!(
                "/api/search?{param}={}&page=1",
                percent(&percent(value))
            )),
        ));
    }
    out
}

/// Requests of `requests.txt`: separated by `===`, CRLF line ends, Content-Length
/// set to the body given.
fn raw_requests(path: &Path) -> Result<Vec<Vec<u8>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for block in text.split("\n===\n") {
        let block = block.trim_start_matches('\n');
        let (head, body) = block.split_once("\n\n").unwrap_or((block, ""));
        let body = body.strip_suffix('\n').unwrap_or(body);
        let mut request = String::new();
        for line in head.lines() {
            if line.to_ascii_lowercase().starts_with("content-length:") {
                let _ = write!(request, "Content-Length: {}\r\n", body.len());
            } else {
                request.push_str(line);
                request.push_str("\r\n");
            }
        }
        request.push_str("\r\n");
        // Chunked bodies are written with LF lines too.
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            request.push_str(&body.trim_end_matches('\n').replace('\n', "\r\n"));
            request.push_str("\r\n\r\n");
        } else {
            request.push_str(body);
        }
        out.push(request.into_bytes());
    }
    Ok(out)
}

pub fn corpus(dir: &Path) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for (file, class) in ATTACK_FILES {
        let path = dir.join("attacks").join(format!("{file}.txt"));
        for payload in lines(&path)? {
            let class = Some(*class);
            if *file == "nosql_injection" {
                match payload.strip_prefix('?') {
                    Some(query) => {
                        cases.push(Case {
                            class,
                            label: format!("query: {payload}"),
                            request: get(&format!("/api/login?{query}")),
                        });
                        let encoded = query
                            .replace('[', "%5B")
                            .replace(']', "%5D")
                            .replace('$', "%24");
                        cases.push(Case {
                            class,
                            label: format!("query, encoded: {payload}"),
                            request: get(&format!("/api/login?{encoded}")),
                        });
                    }
                    None => cases.push(Case {
                        class,
                        label: format!("json: {payload}"),
                        request: post("/api/login", "application/json", &payload),
                    }),
                }
                continue;
            }
            let param = if *file == "ssrf" { "url" } else { "q" };
            for (how, request) in placements(&payload, param, true) {
                cases.push(Case {
                    class,
                    label: format!("{how}: {payload}"),
                    request,
                });
            }
        }
    }
    for value in lines(&dir.join("benign/values.txt"))? {
        for (how, request) in placements(&value, "q", false) {
            cases.push(Case {
                class: None,
                label: format!("{how}: {value}"),
                request,
            });
        }
    }
    for body in lines(&dir.join("benign/json.txt"))? {
        cases.push(Case {
            class: None,
            label: format!("json body: {body}"),
            request: post("/api/data", "application/json", &body),
        });
    }
    for request in raw_requests(&dir.join("benign/requests.txt"))? {
        let first = String::from_utf8_lossy(&request)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        cases.push(Case {
            class: None,
            label: format!("request: {first}"),
            request,
        });
    }
    Ok(cases)
}

/// Each case on a connection of its own, from an address of its own.
fn client_of(index: usize) -> SocketAddr {
    let n = index as u32;
    SocketAddr::new(
        IpAddr::from([10, 200 + (n >> 16) as u8, (n >> 8) as u8, n as u8]),
        40_000,
    )
}

/// Replays every case through the pipeline; returns each one's report.
pub fn replay(cases: &[Case], policy: &Policy) -> Result<Vec<Report>> {
    let server: SocketAddr = SocketAddr::new(IpAddr::from([10, 0, 0, 1]), 8080);
    let mut pipeline = Pipeline::new(
        Limits {
            max_flows: 1024,
            max_memory: 64 << 20,
            idle_timeout: std::time::Duration::from_secs(3600),
            body_inspect_bytes: 16 * 1024,
        },
        Routes::new(&[]),
    );
    let mut state = State::default();
    let mut reports = Vec::with_capacity(cases.len());
    for (index, case) in cases.iter().enumerate() {
        let client = client_of(index);
        let t = index as u64 * 1_000_000;
        // Each case ends with a whole response: what its segments produce is its own.
        let mut report = Report::default();
        let mut exchanged = false;
        let mut stray = None;
        let mut observe = |event: Event<'_>| {
            let (from, found) = match &event {
                Event::Exchange(exchange) => {
                    exchanged = true;
                    let at = SystemTime::now();
                    (
                        exchange.client,
                        policy.detections.inspect(exchange, &mut state, at),
                    )
                }
                Event::ParseError(problem) => {
                    (problem.client, policy.detections.inspect_problem(problem))
                }
                _ => return,
            };
            if from != client {
                stray = Some(from);
            }
            report.score += found.score;
            report.findings.extend(found.findings);
        };
        for (direction, bytes, seq) in [
            (Direction::Request, case.request.as_slice(), 1_000u32),
            (Direction::Response, RESPONSE, 5_000u32),
        ] {
            let mut stream = Stream::new(direction, client, server, seq);
            for chunk in bytes.chunks(MSS) {
                pipeline.ingest(&stream.next(chunk, t), &mut observe);
            }
        }
        if let Some(from) = stray {
            bail!(
                "case {:?}: an event from another connection ({from})",
                case.label
            );
        }
        if !exchanged {
            bail!(
                "corpus request {:?} produced no exchange: the corpus or the pipeline is broken",
                case.label
            );
        }
        reports.push(report);
    }
    Ok(reports)
}

/// The corpus shipped with the tests.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

#[derive(Default)]
pub struct Tally {
    pub total: usize,
    /// Attacks: a rule of the class fired. Benign: a rule of the class fired.
    pub hits: usize,
    /// Attacks: the request crossed the anomaly threshold.
    pub over_threshold: usize,
    pub examples: Vec<String>,
}

/// Detection and false-positive counts of one replay.
pub struct Evaluation {
    pub attacks: BTreeMap<Class, Tally>,
    /// Benign requests flagged by a rule of each class.
    pub benign_by_class: BTreeMap<Class, usize>,
    pub benign: Tally,
}

impl Evaluation {
    pub fn new(cases: &[Case], reports: &[Report], threshold: u32) -> Self {
        let mut attacks: BTreeMap<Class, Tally> = BTreeMap::new();
        let mut benign_by_class: BTreeMap<Class, usize> = BTreeMap::new();
        let mut benign = Tally::default();
        for (case, report) in cases.iter().zip(reports) {
            match case.class {
                Some(class) => {
                    let tally = attacks.entry(class).or_default();
                    tally.total += 1;
                    if report.findings.iter().any(|f| f.rule.class == class) {
                        tally.hits += 1;
                    } else if tally.examples.len() < 50 {
                        tally.examples.push(case.label.clone());
                    }
                    if report.score >= threshold {
                        tally.over_threshold += 1;
                    }
                }
                None => {
                    benign.total += 1;
                    let mut classes: Vec<Class> =
                        report.findings.iter().map(|f| f.rule.class).collect();
                    classes.sort();
                    classes.dedup();
                    for class in &classes {
                        *benign_by_class.entry(*class).or_default() += 1;
                    }
                    if !report.findings.is_empty() {
                        benign.hits += 1;
                        let rules: Vec<&str> = report.findings.iter().map(|f| f.rule.id).collect();
                        benign
                            .examples
                            .push(format!("{} → {}", case.label, rules.join(", ")));
                    }
                    if report.score >= threshold {
                        benign.over_threshold += 1;
                    }
                }
            }
        }
        Self {
            attacks,
            benign_by_class,
            benign,
        }
    }

    /// Percent of attacks of `class` detected.
    pub fn detection_rate(&self, class: Class) -> f64 {
        self.attacks
            .get(&class)
            .map_or(0.0, |t| percent_of(t.hits, t.total))
    }

    /// Percent of benign requests a rule of `class` fired on.
    pub fn false_positive_rate(&self, class: Class) -> f64 {
        percent_of(
            self.benign_by_class.get(&class).copied().unwrap_or(0),
            self.benign.total,
        )
    }
}

pub fn percent_of(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}
