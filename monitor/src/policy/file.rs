//! The policy file: TOML, validated while it is read so every error names its place
//! (`file:line:column: reason`). The same shape is accepted inline as the config's
//! `[policy]` table or as a file of its own.

use std::{
    collections::BTreeMap,
    num::NonZeroU32,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use toml::Spanned;

use crate::cidr;

/// Default TTL of a `block` the rule does not set.
pub const DEFAULT_BLOCK_TTL: Duration = Duration::from_secs(10 * 60);
/// Default TTL of a `throttle` the rule does not set.
pub const DEFAULT_THROTTLE_TTL: Duration = Duration::from_secs(10 * 60);
/// Repeat offences multiply the TTL by this (fail2ban's `bantime.factor`).
pub const DEFAULT_ESCALATION_FACTOR: u32 = 2;
/// The longest an escalated block or throttle lasts.
pub const DEFAULT_ESCALATION_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long an offence is remembered for escalation.
pub const DEFAULT_ESCALATION_MEMORY: Duration = Duration::from_secs(24 * 3600);
/// IPv6 offenders are blocked by this prefix (attackers rotate inside their /64).
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

#[derive(Debug, Error)]
pub enum PolicyError {
    /// One or more errors, each `file:line:column: reason`.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A policy as written (and as `policy show` prints it).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyDoc {
    /// Read the policy from this file instead (only in the config's `[policy]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Record what every rule would do, enforce nothing.
    pub dry_run: bool,
    pub block_ttl: HumanDuration,
    pub throttle_ttl: HumanDuration,
    pub escalation: EscalationDoc,
    /// IPv6 sources are blocked and throttled by this prefix (128: the address only).
    pub ipv6_prefix: Ipv6Prefix,
    /// None: the built-in default rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleDoc>>,
    pub detections: crate::detect::config::DetectionsDoc,
}

impl Default for PolicyDoc {
    fn default() -> Self {
        Self {
            file: None,
            dry_run: false,
            block_ttl: HumanDuration(DEFAULT_BLOCK_TTL),
            throttle_ttl: HumanDuration(DEFAULT_THROTTLE_TTL),
            escalation: EscalationDoc::default(),
            ipv6_prefix: Ipv6Prefix(DEFAULT_IPV6_PREFIX),
            rules: None,
            detections: crate::detect::config::DetectionsDoc::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EscalationDoc {
    /// Each repeat offence within `memory` multiplies the TTL by this (1: no escalation).
    pub factor: NonZeroU32,
    pub max_ttl: HumanDuration,
    pub memory: HumanDuration,
}

impl Default for EscalationDoc {
    fn default() -> Self {
        Self {
            factor: NonZeroU32::new(DEFAULT_ESCALATION_FACTOR).unwrap_or(NonZeroU32::MIN),
            max_ttl: HumanDuration(DEFAULT_ESCALATION_MAX_TTL),
            memory: HumanDuration(DEFAULT_ESCALATION_MEMORY),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// Stop evaluating: later rules do not apply to this request.
    Allow,
    Log,
    Alert,
    /// Rate-limit the offender's packets in the kernel, for a TTL.
    Throttle,
    /// Block the offender in the kernel, for a TTL.
    Block,
}

impl ActionKind {
    pub const fn name(self) -> &'static str {
        match self {
            ActionKind::Allow => "allow",
            ActionKind::Log => "log",
            ActionKind::Alert => "alert",
            ActionKind::Throttle => "throttle",
            ActionKind::Block => "block",
        }
    }

    /// What a dry run of this action is called in metrics and events.
    pub const fn dry_run_name(self) -> &'static str {
        match self {
            ActionKind::Allow => "would_allow",
            ActionKind::Log => "would_log",
            ActionKind::Alert => "would_alert",
            ActionKind::Throttle => "would_throttle",
            ActionKind::Block => "would_block",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    pub id: Spanned<String>,
    #[serde(default)]
    pub name: String,
    pub action: ActionKind,
    #[serde(default)]
    pub dry_run: bool,
    /// Block or throttle TTL (before escalation); default from the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<HumanDuration>,
    /// Packets per second a throttled source may send (action `throttle`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_pps: Option<NonZeroU32>,
    /// ECS event.severity of its events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<u8>,
    #[serde(default, rename = "match")]
    pub matches: MatchDoc,
    /// With a limit, the rule acts only on requests over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitDoc>,
}

/// Conditions, all of which must hold; an empty table matches every request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MatchDoc {
    /// Source address in any of these CIDRs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source: Vec<Cidr>,
    /// Any of these methods (case-insensitive).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub method: Vec<String>,
    /// The Host header without its port, case-insensitive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The route template (`/users/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Header name (case-insensitive) to a condition on its value.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub header: BTreeMap<String, ValueMatch>,
    /// Query parameter to a condition on its (decoded) value.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, ValueMatch>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitDoc {
    /// Requests allowed per `per`, refilled evenly.
    pub requests: NonZeroU32,
    pub per: HumanDuration,
    /// Requests allowed at once (default: `requests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<NonZeroU32>,
    #[serde(default)]
    pub key: RateKey,
    /// Distinct keys tracked at once (least recently seen forgotten first).
    #[serde(default = "default_max_keys")]
    pub max_keys: NonZeroU32,
}

/// Keys tracked per limited rule by default.
pub const DEFAULT_MAX_KEYS: u32 = 100_000;

fn default_max_keys() -> NonZeroU32 {
    NonZeroU32::new(DEFAULT_MAX_KEYS).unwrap_or(NonZeroU32::MIN)
}

/// What a rate limit counts by.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// The source address (an IPv6 source by its policy prefix).
    #[default]
    Ip,
    /// Source address and route template.
    IpRoute,
    /// A header's value (an API key); requests without it are not limited.
    Header(String),
    /// The `sub` claim of a bearer JWT, read without verifying it.
    JwtSub,
}

impl TryFrom<String> for RateKey {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        match text.as_str() {
            "ip" => Ok(RateKey::Ip),
            "ip_route" => Ok(RateKey::IpRoute),
            "jwt_sub" => Ok(RateKey::JwtSub),
            other => match other.strip_prefix("header:") {
                Some(name) if !name.is_empty() => Ok(RateKey::Header(name.to_ascii_lowercase())),
                _ => Err(format!(
                    "invalid rate limit key {other:?}: expected ip, ip_route, jwt_sub or header:NAME"
                )),
            },
        }
    }
}

impl From<&RateKey> for String {
    fn from(key: &RateKey) -> Self {
        match key {
            RateKey::Ip => "ip".into(),
            RateKey::IpRoute => "ip_route".into(),
            RateKey::JwtSub => "jwt_sub".into(),
            RateKey::Header(name) => format!("header:{name}"),
        }
    }
}

/// How a path matches.
#[derive(Clone, Debug, PartialEq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Glob(Glob),
    Regex(Pattern),
}

/// A condition on a header or query value.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueMatch {
    Equals(String),
    Present(bool),
    Prefix(String),
    Regex(Pattern),
}

/// The table form of a match: exactly one key of these.
#[derive(Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MatchTable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    glob: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    present: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MatchInput {
    Text(String),
    Table(MatchTable),
}

/// A match as written: a bare string, or a table with exactly one key of `allowed`.
enum Written {
    Text(String),
    Table(&'static str, MatchTable),
}

/// Reads either form of a match; `expected` says what was wanted when neither fits.
fn read_match<'de, D: serde::Deserializer<'de>>(
    d: D,
    allowed: &[&str],
    expected: &str,
) -> Result<Written, D::Error> {
    use serde::de::Error as _;
    let table = match MatchInput::deserialize(d).map_err(|_| D::Error::custom(expected))? {
        MatchInput::Text(text) => return Ok(Written::Text(text)),
        MatchInput::Table(table) => table,
    };
    let given: Vec<&'static str> = [
        ("exact", table.exact.is_some()),
        ("prefix", table.prefix.is_some()),
        ("glob", table.glob.is_some()),
        ("regex", table.regex.is_some()),
        ("present", table.present.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    match given.as_slice() {
        [one] if allowed.contains(one) => Ok(Written::Table(one, table)),
        [one] => Err(D::Error::custom(format!(
            "`{one}` is not allowed here (use one of {})",
            allowed.join(", ")
        ))),
        _ => Err(D::Error::custom(format!(
            "expected exactly one of {}",
            allowed.join(", ")
        ))),
    }
}

impl<'de> Deserialize<'de> for PathMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let expected = "path: expected a string (exact) or a table with prefix, glob or regex";
        let (kind, table) = match read_match(d, &["exact", "prefix", "glob", "regex"], expected)? {
            Written::Text(text) => return Ok(PathMatch::Exact(text)),
            Written::Table(kind, table) => (kind, table),
        };
        Ok(match kind {
            "exact" => PathMatch::Exact(table.exact.unwrap_or_default()),
            "prefix" => PathMatch::Prefix(table.prefix.unwrap_or_default()),
            "glob" => PathMatch::Glob(
                Glob::new(table.glob.unwrap_or_default()).map_err(D::Error::custom)?,
            ),
            _ => PathMatch::Regex(
                Pattern::new(table.regex.unwrap_or_default()).map_err(D::Error::custom)?,
            ),
        })
    }
}

impl Serialize for PathMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let table = match self {
            PathMatch::Exact(text) => return s.serialize_str(text),
            PathMatch::Prefix(text) => MatchTable {
                prefix: Some(text.clone()),
                ..MatchTable::default()
            },
            PathMatch::Glob(glob) => MatchTable {
                glob: Some(glob.source.clone()),
                ..MatchTable::default()
            },
            PathMatch::Regex(pattern) => MatchTable {
                regex: Some(pattern.source.clone()),
                ..MatchTable::default()
            },
        };
        table.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ValueMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let expected = "expected a string (equals) or a table with exact, present, prefix or regex";
        let (kind, table) = match read_match(d, &["exact", "present", "prefix", "regex"], expected)?
        {
            Written::Text(text) => return Ok(ValueMatch::Equals(text)),
            Written::Table(kind, table) => (kind, table),
        };
        Ok(match kind {
            "exact" => ValueMatch::Equals(table.exact.unwrap_or_default()),
            "present" => ValueMatch::Present(table.present.unwrap_or(true)),
            "prefix" => ValueMatch::Prefix(table.prefix.unwrap_or_default()),
            _ => ValueMatch::Regex(
                Pattern::new(table.regex.unwrap_or_default()).map_err(D::Error::custom)?,
            ),
        })
    }
}

impl Serialize for ValueMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let table = match self {
            ValueMatch::Equals(text) => return s.serialize_str(text),
            ValueMatch::Present(present) => MatchTable {
                present: Some(*present),
                ..MatchTable::default()
            },
            ValueMatch::Prefix(text) => MatchTable {
                prefix: Some(text.clone()),
                ..MatchTable::default()
            },
            ValueMatch::Regex(pattern) => MatchTable {
                regex: Some(pattern.source.clone()),
                ..MatchTable::default()
            },
        };
        table.serialize(s)
    }
}

/// A compiled regular expression that remembers its source.
#[derive(Clone, Debug)]
pub struct Pattern {
    pub source: String,
    pub regex: regex::Regex,
}

impl Pattern {
    pub fn new(source: String) -> Result<Self, String> {
        let regex = regex::RegexBuilder::new(&source)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("invalid regex {source:?}: {}", one_line(&e.to_string())))?;
        Ok(Self { source, regex })
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// A compiled glob (`*` within a segment, `**` across segments).
#[derive(Clone, Debug)]
pub struct Glob {
    pub source: String,
    pub matcher: globset::GlobMatcher,
}

impl Glob {
    pub fn new(source: String) -> Result<Self, String> {
        let glob = globset::GlobBuilder::new(&source)
            .literal_separator(true)
            .build()
            .map_err(|e| format!("invalid glob {source:?}: {e}"))?;
        Ok(Self {
            matcher: glob.compile_matcher(),
            source,
        })
    }
}

impl PartialEq for Glob {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// A CIDR as the contract spells them (a bare address is a host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        cidr::parse(&text)
            .map(Cidr)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A humantime duration (`90s`, `15m`, `7d`), positive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let text = String::deserialize(d)?;
        let duration = crate::clock::parse_duration(&text).map_err(D::Error::custom)?;
        Ok(HumanDuration(duration))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

/// An IPv6 prefix length, 1..=128.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Ipv6Prefix(pub u8);

impl<'de> Deserialize<'de> for Ipv6Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let length = u8::deserialize(d)?;
        if (1..=128).contains(&length) {
            Ok(Ipv6Prefix(length))
        } else {
            Err(serde::de::Error::custom(format!(
                "IPv6 prefix length must be 1..=128, not {length}"
            )))
        }
    }
}

impl<'de> Deserialize<'de> for RateKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RateKey::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for RateKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from(self))
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `file:line:column` of a byte offset in `text` (1-based, columns in characters).
pub fn position(path: &Path, text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("{}:{line}:{column}", path.display())
}

/// A toml error as `file:line:column: reason`.
pub fn located(path: &Path, text: &str, error: &toml::de::Error) -> String {
    let place = error.span().map_or_else(
        || path.display().to_string(),
        |span| position(path, text, span.start),
    );
    format!("{place}: {}", one_line(error.message()))
}

impl PolicyDoc {
    /// Parses a policy file's text; every problem is `file:line:column: reason`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        let doc: PolicyDoc = toml::from_str(text)
            .map_err(|e| PolicyError::Invalid(vec![located(path, text, &e)]))?;
        doc.check(text, path)?;
        Ok(doc)
    }

    pub fn read(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let doc = Self::parse(&text, path)?;
        if doc.file.is_some() {
            return Err(PolicyError::Invalid(vec![format!(
                "{}: `file` is only allowed in the config's [policy] table",
                path.display()
            )]));
        }
        Ok(doc)
    }

    /// What serde cannot see: rule ids unique, throttles with a rate.
    pub fn check(&self, text: &str, path: &Path) -> Result<(), PolicyError> {
        let mut errors = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for rule in self.rules.iter().flatten() {
            let at = || position(path, text, rule.id.span().start);
            let id = rule.id.get_ref();
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                errors.push(format!(
                    "{}: rule id {id:?} must be letters, digits, '-', '_' or '.'",
                    at()
                ));
            }
            if !seen.insert(id.clone()) {
                errors.push(format!("{}: duplicate rule id {id:?}", at()));
            }
            if rule.action == ActionKind::Throttle && rule.throttle_pps.is_none() {
                errors.push(format!(
                    "{}: rule {id:?}: action throttle needs throttle_pps",
                    at()
                ));
            }
            if rule.action != ActionKind::Throttle && rule.throttle_pps.is_some() {
                errors.push(format!(
                    "{}: rule {id:?}: throttle_pps only applies to action throttle",
                    at()
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PolicyError::Invalid(errors))
        }
    }
}
