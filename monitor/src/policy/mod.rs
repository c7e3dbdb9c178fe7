//! The policy: ordered rules matched against each request as soon as its head is
//! parsed, with optional rate limits; what they decide, the daemon enforces.

pub mod file;
pub mod limiter;

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use ipnet::{IpNet, Ipv6Net};

use self::{
    file::{
        ActionKind, HumanDuration, MatchDoc, PathMatch, PolicyDoc, PolicyError, RateKey,
        RateLimitDoc, RuleDoc, ValueMatch,
    },
    limiter::{LimitKey, Limiter, jwt_subject},
};
use crate::{
    detect::Detections,
    http::{parse::RequestHead, query, route},
};

/// Where the active policy came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Builtin,
    /// Inline in the config file.
    Config(PathBuf),
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Builtin => f.write_str("builtin"),
            Source::Config(path) | Source::File(path) => path.display().fmt(f),
        }
    }
}

struct Rule {
    doc: RuleDoc,
    limiter: Option<Arc<Limiter>>,
}

/// A loaded policy, ready to evaluate.
pub struct Policy {
    pub doc: PolicyDoc,
    pub source: Source,
    pub loaded_at: SystemTime,
    rules: Vec<Rule>,
    /// Whether any rule reads headers (they are parsed only then).
    reads_headers: bool,
    /// Whether any rule matches on the path (it is normalised only then).
    reads_path: bool,
    pub detections: Arc<Detections>,
}

/// What one request is judged on.
pub struct Request<'a> {
    pub source: IpAddr,
    pub head: &'a RequestHead,
    pub route: &'a str,
}

/// A rule that fired on a request (borrowing its names from the policy: an offender
/// over a limit makes one per request).
#[derive(Clone, Debug, PartialEq)]
pub struct Decision<'p> {
    /// The rule's position in the policy (stable until the next reload).
    pub rule_index: usize,
    pub rule_id: &'p str,
    pub rule_name: &'p str,
    pub action: ActionKind,
    /// The rate limit's period (None: the rule has no limit); a rule with a limit fires
    /// only over it: how often an offender's over-limit requests are
    /// reported as events (each is still counted).
    pub window: Option<Duration>,
    /// Recorded only: the rule or the whole policy is in dry run.
    pub dry_run: bool,
    /// Block or throttle TTL before escalation.
    pub ttl: Duration,
    pub throttle_pps: Option<NonZeroU32>,
    pub severity: Option<u8>,
    /// The OWASP API Top 10 category of a detection's verdict (`API8:2023`).
    pub category: Option<&'static str>,
}

impl Decision<'_> {
    /// Fired because a rate limit was exceeded.
    pub fn rate_limited(&self) -> bool {
        self.window.is_some()
    }

    /// The `action` label: what was done, or what would have been.
    pub fn label(&self) -> &'static str {
        if self.dry_run {
            self.action.dry_run_name()
        } else {
            self.action.name()
        }
    }
}

/// The rules used when the configuration names none: observe, never enforce.
pub fn builtin_rules() -> Vec<RuleDoc> {
    vec![RuleDoc {
        id: toml::Spanned::new(0..0, "builtin-client-flood".into()),
        name: "One client over 600 requests a minute".into(),
        action: ActionKind::Alert,
        dry_run: false,
        ttl: None,
        throttle_pps: None,
        severity: Some(5),
        matches: MatchDoc::default(),
        rate_limit: Some(RateLimitDoc {
            requests: NonZeroU32::new(600).unwrap_or(NonZeroU32::MIN),
            per: HumanDuration(Duration::from_secs(60)),
            burst: None,
            key: RateKey::Ip,
            max_keys: NonZeroU32::new(file::DEFAULT_MAX_KEYS).unwrap_or(NonZeroU32::MIN),
        }),
    }]
}

impl Policy {
    /// Builds the policy (reading the files its detections name). Limiters of rules
    /// whose id and limit are unchanged from `previous` are kept, with their state.
    pub fn new(
        doc: PolicyDoc,
        source: Source,
        previous: Option<&Policy>,
    ) -> Result<Self, PolicyError> {
        let detections = Detections::new(&doc.detections)
            .map_err(|e| PolicyError::Invalid(vec![format!("{source}: {e}")]))?;
        let kept: HashMap<&str, &Rule> = previous
            .map(|p| {
                p.rules
                    .iter()
                    .map(|r| (r.doc.id.get_ref().as_str(), r))
                    .collect()
            })
            .unwrap_or_default();
        let docs = doc.rules.clone().unwrap_or_else(builtin_rules);
        let rules: Vec<Rule> = docs
            .into_iter()
            .map(|rule| {
                // Same id, same conditions, same limit: the limiter keeps its state.
                let limiter = rule.rate_limit.as_ref().map(|limit| {
                    kept.get(rule.id.get_ref().as_str())
                        .filter(|old| {
                            old.doc.matches == rule.matches
                                && old.doc.rate_limit.as_ref() == Some(limit)
                        })
                        .and_then(|old| old.limiter.clone())
                        .unwrap_or_else(|| Arc::new(Limiter::new(limit)))
                });
                Rule { doc: rule, limiter }
            })
            .collect();
        let reads_headers = rules.iter().any(|r| {
            !r.doc.matches.header.is_empty()
                || matches!(
                    r.doc.rate_limit.as_ref().map(|l| &l.key),
                    Some(RateKey::Header(_) | RateKey::JwtSub)
                )
        });
        let reads_path = rules.iter().any(|r| r.doc.matches.path.is_some());
        Ok(Self {
            doc,
            source,
            loaded_at: SystemTime::now(),
            rules,
            reads_headers,
            reads_path,
            detections: Arc::new(detections),
        })
    }

    /// The built-in policy (it reads no files, so it always builds).
    pub fn builtin() -> Self {
        match Self::new(PolicyDoc::default(), Source::Builtin, None) {
            Ok(policy) => policy,
            Err(_) => unreachable!("the built-in policy names no files"),
        }
    }

    /// The policy the config describes: inline, from the file it names, or built in.
    pub fn from_config(
        doc: &PolicyDoc,
        config_path: &Path,
        previous: Option<&Policy>,
    ) -> Result<Self, PolicyError> {
        match &doc.file {
            Some(path) => {
                let mut from_file = PolicyDoc::read(path)?;
                from_file.file = None;
                Self::new(from_file, Source::File(path.clone()), previous)
            }
            None if doc.rules.is_some() || doc.detections != Default::default() => Self::new(
                doc.clone(),
                Source::Config(config_path.to_owned()),
                previous,
            ),
            None => Self::new(doc.clone(), Source::Builtin, previous),
        }
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The effective policy as TOML (defaults filled in, built-in rules shown).
    pub fn to_toml(&self) -> String {
        let mut doc = self.doc.clone();
        doc.rules = Some(self.rules.iter().map(|r| r.doc.clone()).collect());
        toml::to_string_pretty(&doc).unwrap_or_else(|e| format!("# cannot print the policy: {e}\n"))
    }

    /// How long a block or throttle lasts (before escalation) when its rule says not.
    pub fn default_ttl(&self, action: ActionKind) -> Duration {
        match action {
            ActionKind::Throttle => self.doc.throttle_ttl.0,
            _ => self.doc.block_ttl.0,
        }
    }

    /// The network an enforcement covers: IPv6 sources by the policy's prefix.
    pub fn offender_net(&self, source: IpAddr) -> IpNet {
        match source {
            IpAddr::V4(v4) => IpNet::V4(v4.into()),
            IpAddr::V6(v6) => Ipv6Net::new(v6, self.doc.ipv6_prefix.0)
                .map(|net| IpNet::V6(net.trunc()))
                .unwrap_or(IpNet::V6(v6.into())),
        }
    }

    /// The rules that fire on `request`, in order. Evaluation stops after an `allow`,
    /// `throttle` or `block` (also in dry run: it records what would have happened).
    pub fn evaluate(&self, request: &Request<'_>) -> Vec<Decision<'_>> {
        if self.rules.is_empty() {
            return Vec::new();
        }
        let view = RequestView::new(request, self.reads_headers, self.reads_path);
        let mut decisions = Vec::new();
        for (rule_index, rule) in self.rules.iter().enumerate() {
            if !matches(&rule.doc.matches, &view) {
                continue;
            }
            // A limited rule fires only over its limit (and only on requests that have
            // its key); an unlimited one on every match.
            let fires = match (&rule.limiter, &rule.doc.rate_limit) {
                (Some(limiter), Some(limit)) => self
                    .limit_key(&limit.key, &view)
                    .is_some_and(|key| limiter.exceeded(&key)),
                _ => true,
            };
            if !fires {
                continue;
            }
            let action = rule.doc.action;
            let ttl = rule
                .doc
                .ttl
                .map_or_else(|| self.default_ttl(action), |ttl| ttl.0);
            decisions.push(Decision {
                rule_index,
                rule_id: rule.doc.id.get_ref(),
                rule_name: &rule.doc.name,
                action,
                window: rule.doc.rate_limit.as_ref().map(|limit| limit.per.0),
                dry_run: self.doc.dry_run || rule.doc.dry_run,
                ttl,
                throttle_pps: rule.doc.throttle_pps,
                severity: rule.doc.severity,
                category: None,
            });
            if matches!(
                action,
                ActionKind::Allow | ActionKind::Throttle | ActionKind::Block
            ) {
                break;
            }
        }
        decisions
    }

    fn limit_key(&self, key: &RateKey, view: &RequestView<'_>) -> Option<LimitKey> {
        let client = match self.offender_net(view.source) {
            IpNet::V6(net) if net.prefix_len() < 128 => IpAddr::V6(net.network()),
            _ => view.source,
        };
        match key {
            RateKey::Ip => Some(LimitKey::Ip(client)),
            RateKey::IpRoute => Some(LimitKey::IpRoute(client, view.route.to_owned())),
            RateKey::Header(name) => view.header(name).map(LimitKey::of_value),
            RateKey::JwtSub => view
                .header("authorization")
                .and_then(jwt_subject)
                .map(|sub| LimitKey::of_value(&sub)),
        }
    }
}

/// A request's fields as rules see them.
struct RequestView<'a> {
    source: IpAddr,
    method: &'a str,
    host: Option<&'a str>,
    query: &'a str,
    /// Normalised for matching (decoded, dot segments resolved, absolute form stripped);
    /// empty unless a rule matches on paths.
    path: String,
    route: &'a str,
    headers: Vec<(&'a str, &'a str)>,
}

impl<'a> RequestView<'a> {
    fn new(request: &Request<'a>, with_headers: bool, with_path: bool) -> Self {
        let head = request.head;
        let target = head.target();
        let (_, query) = route::split_target(target);
        Self {
            source: request.source,
            method: head.method(),
            host: head.host(),
            query: query.unwrap_or_default(),
            path: if with_path {
                route::normalised_path(target)
            } else {
                String::new()
            },
            route: request.route,
            headers: if with_headers {
                head.headers()
            } else {
                Vec::new()
            },
        }
    }

    fn path(&self) -> &str {
        &self.path
    }

    fn query(&self) -> &str {
        self.query
    }

    fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// The Host header without its port.
    fn host_name(&self) -> Option<&str> {
        let host = self.host?;
        Some(match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(v6),
            None => host.rsplit_once(':').map_or(host, |(name, _)| name),
        })
    }
}

fn matches(m: &MatchDoc, r: &RequestView<'_>) -> bool {
    if !m.source.is_empty() && !m.source.iter().any(|net| net.0.contains(&r.source)) {
        return false;
    }
    if !m.method.is_empty() && !m.method.iter().any(|x| x.eq_ignore_ascii_case(r.method)) {
        return false;
    }
    if let Some(host) = &m.host
        && !r.host_name().is_some_and(|h| h.eq_ignore_ascii_case(host))
    {
        return false;
    }
    if let Some(path) = &m.path
        && !path_matches(path, r.path())
    {
        return false;
    }
    if let Some(route) = &m.route
        && route != r.route
    {
        return false;
    }
    let header_ok = m
        .header
        .iter()
        .all(|(name, cond)| value_matches(cond, r.header(name)));
    if !header_ok {
        return false;
    }
    m.query.iter().all(|(name, cond)| {
        let value = query::pairs(r.query())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v);
        value_matches(cond, value.as_deref())
    })
}

fn path_matches(m: &PathMatch, path: &str) -> bool {
    match m {
        PathMatch::Exact(p) => p == path,
        PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        PathMatch::Glob(g) => g.matcher.is_match(path),
        PathMatch::Regex(p) => p.regex.is_match(path),
    }
}

fn value_matches(m: &ValueMatch, value: Option<&str>) -> bool {
    match (m, value) {
        (ValueMatch::Present(wanted), value) => *wanted == value.is_some(),
        (_, None) => false,
        (ValueMatch::Equals(x), Some(v)) => x == v,
        (ValueMatch::Prefix(x), Some(v)) => v.starts_with(x.as_str()),
        (ValueMatch::Regex(p), Some(v)) => p.regex.is_match(v),
    }
}

#[cfg(test)]
mod tests;
