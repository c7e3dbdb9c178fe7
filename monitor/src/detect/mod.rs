//! Detections: what in a request (and its response) looks like an attack, by rule,
//! severity and OWASP API Security Top 10 category, scored per request like the
//! Core Rule Set's anomaly scoring. Pure logic over observed exchanges: the verdict
//! layer turns findings into events, metrics and enforcement.

pub mod auth;
pub mod behaviour;
pub mod catalog;
pub mod config;
pub mod contract;
pub mod decode;
pub mod injection;
pub mod inputs;
pub mod protocol;
pub mod ssrf;

use std::{collections::HashMap, net::IpAddr, path::PathBuf, time::SystemTime};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use thiserror::Error;

use self::{
    auth::Auth,
    behaviour::{Observation, Tracker},
    catalog::RuleInfo,
    config::{DetectionsDoc, Mode, RuleSettings},
    contract::{Call, Contract},
    inputs::Location,
};
use crate::{
    http::{Exchange, Problem, parse::Side, route},
    policy::file::ActionKind,
};

#[derive(Debug, Error)]
pub enum DetectError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Query parameters that size a page of results (not `size` or `max`: image sizes and
/// price filters use them).
const PAGE_SIZE_NAMES: &[&str] = &[
    "limit",
    "per_page",
    "perpage",
    "page_size",
    "pagesize",
    "top",
    "take",
    "max_results",
    "maxresults",
];

pub(crate) fn glob_set(key: &str, patterns: &[String]) -> Result<GlobSet, DetectError> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        // Paths as servers that ignore case see them (`/Admin` is `/admin`).
        let glob = GlobBuilder::new(pattern)
            .case_insensitive(true)
            .build()
            .map_err(|e| DetectError::Invalid(format!("{key}: {pattern:?}: {e}")))?;
        builder.add(glob);
    }
    builder
        .build()
        .map_err(|e| DetectError::Invalid(format!("{key}: {e}")))
}

/// Input scans remembered (values repeat: user agents, path segments, parameters).
const SCAN_CACHE: usize = 16 * 1024;

/// What detections keep between requests: behaviour windows, and the rules each
/// recently seen input broke (scanning a value is a pure function of its place,
/// name and text, so a repeat is a lookup).
pub struct State {
    pub behaviour: Tracker,
    scans: lru::LruCache<u64, Vec<&'static RuleInfo>>,
    /// Keyed per process: nobody can aim a value at another's cache slot.
    hasher: std::hash::RandomState,
}

impl Default for State {
    fn default() -> Self {
        Self {
            behaviour: Tracker::default(),
            scans: lru::LruCache::new(
                std::num::NonZeroUsize::new(SCAN_CACHE).unwrap_or(std::num::NonZeroUsize::MIN),
            ),
            hasher: std::hash::RandomState::new(),
        }
    }
}

impl State {
    /// The injection and SSRF rules `input` breaks.
    fn scan(&mut self, input: &inputs::Input<'_>) -> Vec<&'static RuleInfo> {
        use std::hash::BuildHasher;
        let mut rules = Vec::new();
        if !injection::costly(&input.value) {
            injection::scan(input, &mut rules);
            rules.extend(ssrf::scan(input));
            return rules;
        }
        let key = self
            .hasher
            .hash_one((input.location as u8, &input.name, &input.value));
        if let Some(rules) = self.scans.get(&key) {
            return rules.clone();
        }
        injection::scan(input, &mut rules);
        rules.extend(ssrf::scan(input));
        self.scans.put(key, rules.clone());
        rules
    }
}

/// One rule that fired on a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub rule: &'static RuleInfo,
    /// Where: `query:q`, `json:user.name`, `header:user-agent`, `path`...
    pub location: String,
    /// What matched, decoded and cut short; a credential when `secret`.
    pub evidence: String,
    pub secret: bool,
    /// Reported only: neither scored nor acted on.
    pub dry_run: bool,
    /// Acted on at once (the rule's own action, or the anomaly action).
    pub action: Option<ActionKind>,
}

/// Everything detections found in one request.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// The anomaly score (findings not in dry run, each rule once).
    pub score: u32,
}

/// The compiled `[detections]` of a policy.
pub struct Detections {
    pub doc: DetectionsDoc,
    auth: Auth,
    contract: Contract,
    admin_routes: GlobSet,
    rules: HashMap<&'static str, RuleSettings>,
    /// Per route template: rule id to its mode there.
    routes: HashMap<String, Vec<(&'static str, Mode)>>,
}

fn known_rule(id: &str, key: &str) -> Result<&'static RuleInfo, DetectError> {
    catalog::find(id).ok_or_else(|| {
        DetectError::Invalid(format!(
            "{key}: unknown detection rule {id:?} (known: {})",
            catalog::ALL
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

impl Detections {
    pub fn new(doc: &DetectionsDoc) -> Result<Self, DetectError> {
        if !(1..=4).contains(&doc.paranoia) {
            return Err(DetectError::Invalid(format!(
                "detections.paranoia: {} is not a level from 1 to 4",
                doc.paranoia
            )));
        }
        if doc.anomaly_action == ActionKind::Throttle
            && doc
                .rules
                .get(catalog::ANOMALY.id)
                .and_then(|s| s.throttle_pps)
                .is_none()
        {
            return Err(DetectError::Invalid(
                "detections.anomaly_action throttle needs detections.rules.anomaly-score.throttle_pps"
                    .into(),
            ));
        }
        let behaviour = &doc.behaviour;
        for (key, value) in [
            ("enumeration_ids", behaviour.enumeration_ids),
            ("failed_logins", behaviour.failed_logins),
            ("not_found", behaviour.not_found),
        ] {
            if value == 0 {
                return Err(DetectError::Invalid(format!(
                    "detections.behaviour.{key}: must be at least 1"
                )));
            }
        }
        if doc.anomaly_threshold == 0 {
            return Err(DetectError::Invalid(
                "detections.anomaly_threshold: must be at least 1".into(),
            ));
        }
        let mut rules = HashMap::new();
        for (id, settings) in &doc.rules {
            let rule = known_rule(id, "detections.rules")?;
            if settings.action == Some(ActionKind::Throttle) && settings.throttle_pps.is_none() {
                return Err(DetectError::Invalid(format!(
                    "detections.rules.{id}: action throttle needs throttle_pps"
                )));
            }
            rules.insert(rule.id, settings.clone());
        }
        let mut routes: HashMap<String, Vec<(&'static str, Mode)>> = HashMap::new();
        for route in &doc.routes {
            let modes = routes.entry(route.route.clone()).or_default();
            for id in &route.off {
                modes.push((known_rule(id, "detections.routes.off")?.id, Mode::Off));
            }
            for id in &route.dry_run {
                modes.push((
                    known_rule(id, "detections.routes.dry_run")?.id,
                    Mode::DryRun,
                ));
            }
        }
        Ok(Self {
            auth: Auth::new(&doc.auth)?,
            contract: Contract::new(&doc.schemas, doc.openapi.as_deref())?,
            admin_routes: glob_set(
                "detections.behaviour.admin_routes",
                &doc.behaviour.admin_routes,
            )?,
            rules,
            routes,
            doc: doc.clone(),
        })
    }

    /// Route templates the OpenAPI description defines.
    pub fn route_templates(&self) -> Vec<String> {
        self.contract.templates()
    }

    /// What the policy sets for the rule with this id (its TTL and rate when it acts).
    pub fn settings(&self, id: &str) -> Option<&RuleSettings> {
        self.rules.get(id)
    }

    /// Whether `rule` runs on `route`, and if so whether in dry run.
    fn mode(&self, rule: &RuleInfo, route: &str) -> Option<bool> {
        let settings = self.settings(rule.id);
        let route_mode = self
            .routes
            .get(route)
            .and_then(|modes| modes.iter().find(|(id, _)| *id == rule.id))
            .map(|(_, mode)| *mode);
        let mode = route_mode.or(settings.map(|s| s.mode)).unwrap_or_default();
        match mode {
            Mode::Off => None,
            Mode::Default if rule.paranoia > self.doc.paranoia => None,
            Mode::DryRun => Some(true),
            Mode::On | Mode::Default => Some(self.doc.dry_run),
        }
    }

    /// Scores the findings, adds the anomaly finding when over the threshold.
    fn report(&self, hits: Vec<Hit>, route: &str) -> Report {
        let mut report = Report::default();
        for hit in hits {
            if report.findings.iter().any(|f| f.rule.id == hit.rule.id) {
                continue;
            }
            let Some(dry_run) = self.mode(hit.rule, route) else {
                continue;
            };
            if !dry_run {
                report.score += hit.rule.severity.score();
            }
            report.findings.push(Finding {
                rule: hit.rule,
                location: hit.location,
                evidence: inputs::evidence(&hit.evidence).into_owned(),
                secret: hit.secret,
                dry_run,
                action: self.settings(hit.rule.id).and_then(|s| s.action),
            });
        }
        if report.score >= self.doc.anomaly_threshold
            && let Some(dry_run) = self.mode(catalog::ANOMALY, route)
        {
            let rules: Vec<&str> = report
                .findings
                .iter()
                .filter(|f| !f.dry_run)
                .map(|f| f.rule.id)
                .collect();
            report.findings.push(Finding {
                rule: catalog::ANOMALY,
                location: String::new(),
                evidence: format!("score {}: {}", report.score, rules.join(", ")),
                secret: false,
                dry_run,
                action: Some(
                    self.settings(catalog::ANOMALY.id)
                        .and_then(|s| s.action)
                        .unwrap_or(self.doc.anomaly_action),
                ),
            });
        }
        report
    }

    /// Inspects one exchange (request, body as kept, response status and size).
    pub fn inspect(&self, exchange: &Exchange, state: &mut State, now: SystemTime) -> Report {
        if !self.doc.enabled {
            return Report::default();
        }
        let head = &exchange.request;
        let headers = head.headers();
        // The normalised path is only needed by path globs and the OpenAPI routes.
        let needs_path = self.auth.needs_path(exchange.status)
            || !self.admin_routes.is_empty()
            || self.contract.has_routes();
        let path = if needs_path {
            route::normalised_path(head.target())
        } else {
            String::new()
        };
        let (_, query) = route::split_target(head.target());
        let body = &exchange.request_body;
        // A body that did not end (the connection ended, the chunking broke) is not an
        // empty body: checks of a whole body are skipped.
        let complete = exchange.request_body_complete;
        let body_whole = complete && body.len() as u64 == exchange.request_body_bytes;
        // Only a body can stop short, so an incomplete one was sent even at 0 bytes.
        let has_body = exchange.request_body_bytes > 0 || !complete;
        let content_type = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| *v);
        let body = inputs::Body::read(content_type, body, body_whole);
        let collected = inputs::Inputs::collect(head, &headers, &body, self.doc.paranoia >= 2);
        let mut hits = Vec::new();
        for input in &collected.list {
            let mut rules = state.scan(input);
            if auth::in_query(input) {
                rules.push(catalog::CREDENTIALS_IN_QUERY);
            }
            if input.location == Location::Query
                && PAGE_SIZE_NAMES
                    .iter()
                    .any(|name| input.name.eq_ignore_ascii_case(name))
                && input
                    .value
                    .trim()
                    .parse::<i64>()
                    .is_ok_and(|n| n < 0 || n.unsigned_abs() > self.doc.limits.max_page_size)
            {
                rules.push(catalog::UNBOUNDED_PAGE);
            }
            if rules.is_empty() {
                continue;
            }
            let secret = input.location == Location::Cookie
                || crate::secrets::may_hold_secret(&input.name)
                || auth::looks_like_jwt(&input.value)
                || (input.location == Location::Header && input.value.contains('?'))
                || rules.contains(&catalog::CREDENTIALS_IN_QUERY);
            for rule in &rules {
                hits.push(Hit {
                    rule,
                    location: if input.name.is_empty() {
                        input.location.name().to_owned()
                    } else {
                        format!("{}:{}", input.location.name(), input.name)
                    },
                    evidence: input.value.to_string(),
                    secret,
                });
            }
        }
        let mut found = Vec::new();
        protocol::scan_head(head, &self.doc.limits, &mut found);
        if collected.truncated {
            found.push((catalog::INSPECTION_LIMIT, String::new()));
        }
        if body.malformed_json {
            found.push((catalog::MALFORMED_JSON, String::new()));
        }
        let credentials = self.auth.credentials(&headers);
        let mut auth_found = Vec::new();
        let subject = self.auth.scan(&path, &credentials, now, &mut auth_found);
        self.contract.check(
            &Call {
                method: head.method(),
                path: &path,
                route: &exchange.route,
                query: query.unwrap_or_default(),
                headers: &headers,
                content_type,
                has_body,
                json: body.json.as_ref(),
            },
            &mut found,
        );
        if let Some(scanner) = head.user_agent().and_then(behaviour::scanner) {
            found.push((catalog::SCANNER_AGENT, scanner.to_owned()));
        }
        let client = exchange.client.ip().to_canonical();
        if !self.admin_routes.is_empty()
            && self.admin_routes.is_match(&path)
            && !self.admin_allowed(client, subject.as_deref())
        {
            found.push((catalog::ADMIN_ROUTE, path.clone()));
        }
        if exchange.response_body_bytes > self.doc.limits.max_response_bytes {
            found.push((
                catalog::OVERSIZE_RESPONSE,
                format!("{} bytes", exchange.response_body_bytes),
            ));
        }
        state.behaviour.observe(
            &Observation {
                client,
                route: &exchange.route,
                object_id: object_id(&exchange.route, head.target()),
                status: exchange.status,
                login: matches!(exchange.status, Some(401 | 403))
                    && self.auth.login.is_match(&path),
            },
            &self.doc.behaviour,
            exchange.started_ns,
            &mut found,
        );
        hits.extend(found.into_iter().map(|(rule, evidence)| Hit {
            rule,
            location: String::new(),
            evidence,
            secret: false,
        }));
        // Their evidence is apimon's own words (never the token).
        hits.extend(auth_found.into_iter().map(|(rule, evidence)| Hit {
            rule,
            location: "header:authorization".into(),
            evidence,
            secret: false,
        }));
        self.report(hits, &exchange.route)
    }

    /// Bytes a client sent that the parser refused (smuggling signs and such); what
    /// servers send is not the client's doing.
    pub fn inspect_problem(&self, problem: &Problem) -> Report {
        if !self.doc.enabled || problem.side != Side::Request {
            return Report::default();
        }
        let kind = problem.kind;
        let hits = protocol::rule_of_problem(kind)
            .map(|rule| Hit {
                rule,
                location: String::new(),
                evidence: kind.name().to_owned(),
                secret: false,
            })
            .into_iter()
            .collect();
        self.report(hits, "")
    }

    /// Admin routes are for the allowed networks, and for allowed subjects of tokens
    /// whose signature verifies (an unverified `sub` is the attacker's to choose).
    fn admin_allowed(&self, client: IpAddr, verified_subject: Option<&str>) -> bool {
        let behaviour = &self.doc.behaviour;
        behaviour
            .admin_sources
            .iter()
            .any(|net| net.0.contains(&client))
            || verified_subject.is_some_and(|sub| behaviour.admin_subjects.iter().any(|s| s == sub))
    }
}

struct Hit {
    rule: &'static RuleInfo,
    location: String,
    evidence: String,
    secret: bool,
}

/// The raw path segment the route template calls an id (`{id}`, `{userId}`).
fn object_id<'a>(route: &str, target: &'a str) -> Option<&'a str> {
    // Both without their leading slashes, as the template was made.
    let path = route::path_of(target).trim_start_matches('/');
    route
        .trim_start_matches('/')
        .split('/')
        .zip(path.split('/'))
        .find(|(template, _)| template.starts_with('{'))
        .map(|(_, segment)| segment)
        .filter(|segment| !segment.is_empty())
}

#[cfg(test)]
mod tests;
