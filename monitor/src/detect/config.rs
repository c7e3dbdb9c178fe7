//! The `[detections]` table of a policy: what runs, how sensitive, what it does.

use std::{collections::BTreeMap, num::NonZeroU32, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::policy::file::{ActionKind, Cidr, HumanDuration};

/// Paranoia level by default: the rules with few false positives.
pub const DEFAULT_PARANOIA: u8 = 1;
/// Anomaly score at which a request counts as an attack (one critical finding).
pub const DEFAULT_ANOMALY_THRESHOLD: u32 = 5;
/// One event per rule and client per this window (every finding is counted).
pub const DEFAULT_REPORT_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_URI_BYTES: usize = 8 * 1024;
pub const DEFAULT_MAX_HEADERS: u16 = 100;
pub const DEFAULT_MAX_HEAD_BYTES: usize = 32 * 1024;
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 50 * 1024 * 1024;
pub const DEFAULT_MAX_PAGE_SIZE: u64 = 1000;
pub const DEFAULT_BEHAVIOUR_WINDOW: Duration = Duration::from_secs(60);
/// High enough for a page that loads a gallery of objects.
pub const DEFAULT_ENUMERATION_IDS: u32 = 100;
pub const DEFAULT_FAILED_LOGINS: u32 = 10;
pub const DEFAULT_NOT_FOUND: u32 = 30;
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DetectionsDoc {
    pub enabled: bool,
    /// 1 to 4: higher runs more rules, with more false positives.
    pub paranoia: u8,
    pub anomaly_threshold: u32,
    /// What a request over the threshold leads to.
    pub anomaly_action: ActionKind,
    /// Record what detections would do, enforce nothing.
    pub dry_run: bool,
    pub report_window: HumanDuration,
    /// Per rule id: switched off, dry run, an action of its own.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, RuleSettings>,
    /// Per route template: rules off or in dry run there.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSettings>,
    pub limits: LimitsDoc,
    pub auth: AuthDoc,
    pub behaviour: BehaviourDoc,
    /// JSON Schemas for request bodies, per route.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schemas: Vec<SchemaDoc>,
    /// An OpenAPI 3 description (JSON or YAML): routes, methods, parameters, bodies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub openapi: Option<PathBuf>,
}

impl Default for DetectionsDoc {
    fn default() -> Self {
        Self {
            enabled: true,
            paranoia: DEFAULT_PARANOIA,
            anomaly_threshold: DEFAULT_ANOMALY_THRESHOLD,
            anomaly_action: ActionKind::Alert,
            dry_run: false,
            report_window: HumanDuration(DEFAULT_REPORT_WINDOW),
            rules: BTreeMap::new(),
            routes: Vec::new(),
            limits: LimitsDoc::default(),
            auth: AuthDoc::default(),
            behaviour: BehaviourDoc::default(),
            schemas: Vec::new(),
            openapi: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Runs at its paranoia level (default).
    #[default]
    Default,
    /// Runs whatever the paranoia level.
    On,
    Off,
    /// Runs and reports, never scores or acts.
    DryRun,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuleSettings {
    pub mode: Mode,
    /// Act on this rule's findings at once, without waiting for the anomaly score.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<HumanDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_pps: Option<NonZeroU32>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// Route template (`/users/{id}`), as in metrics.
    pub route: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub off: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsDoc {
    pub max_uri_bytes: usize,
    pub max_headers: u16,
    pub max_head_bytes: usize,
    pub max_body_bytes: u64,
    pub max_response_bytes: u64,
    /// Largest page a `limit`, `per_page`, `page_size`... parameter may ask for.
    pub max_page_size: u64,
}

impl Default for LimitsDoc {
    fn default() -> Self {
        Self {
            max_uri_bytes: DEFAULT_MAX_URI_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_page_size: DEFAULT_MAX_PAGE_SIZE,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthDoc {
    /// Path globs (`/api/**`) whose requests must carry credentials.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<String>,
    /// Path globs of login endpoints (for brute-force detection).
    pub login: Vec<String>,
    /// Headers that carry credentials, besides Authorization.
    pub credential_headers: Vec<String>,
    /// Cookies that carry a session.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub credential_cookies: Vec<String>,
    /// HS256 secret (the file's bytes, a trailing newline dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret_file: Option<PathBuf>,
    /// RS256/ES256 keys as a JWKS document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    pub jwt_leeway: HumanDuration,
}

impl Default for AuthDoc {
    fn default() -> Self {
        Self {
            required: Vec::new(),
            login: [
                "**/login",
                "**/signin",
                "**/sign-in",
                "**/sessions",
                "**/oauth/token",
                "**/auth/token",
            ]
            .map(String::from)
            .to_vec(),
            credential_headers: vec!["x-api-key".into()],
            credential_cookies: Vec::new(),
            jwt_secret_file: None,
            jwks_file: None,
            jwt_leeway: HumanDuration(DEFAULT_JWT_LEEWAY),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BehaviourDoc {
    pub window: HumanDuration,
    /// Distinct object ids of one route one client may touch per window.
    pub enumeration_ids: u32,
    /// Failed logins (401/403) per client, or per IPv6 /64, per window.
    pub failed_logins: u32,
    /// 404 responses per client per window.
    pub not_found: u32,
    /// Path globs of admin functions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub admin_routes: Vec<String>,
    /// Networks admin routes may be called from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub admin_sources: Vec<Cidr>,
    /// JWT subjects that may call admin routes from anywhere.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub admin_subjects: Vec<String>,
}

impl Default for BehaviourDoc {
    fn default() -> Self {
        Self {
            window: HumanDuration(DEFAULT_BEHAVIOUR_WINDOW),
            enumeration_ids: DEFAULT_ENUMERATION_IDS,
            failed_logins: DEFAULT_FAILED_LOGINS,
            not_found: DEFAULT_NOT_FOUND,
            admin_routes: Vec::new(),
            admin_sources: Vec::new(),
            admin_subjects: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchemaDoc {
    /// Route template (`/users/{id}`).
    pub route: String,
    /// Methods it applies to (default: POST, PUT and PATCH).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// The JSON Schema file.
    pub file: PathBuf,
    /// Content types accepted (default: application/json).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_types: Vec<String>,
}
