//! Every detection apimon knows: a stable id, a name, its OWASP API Security Top 10
//! (2023) category, a severity that sets its anomaly score, and the paranoia level
//! from which it runs (as in the OWASP Core Rule Set).

use serde::Serialize;

/// OWASP API Security Top 10, 2023 edition. Injection has no entry of its own since
/// 2023; like most API security vendors apimon files it under API8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Category {
    Api1Bola,
    Api2Authentication,
    Api3PropertyAuthorization,
    Api4ResourceConsumption,
    Api5Bfla,
    Api7Ssrf,
    Api8Misconfiguration,
    Api9Inventory,
}

impl Category {
    /// The metric label and `rule.category`: the list's short id.
    pub const fn id(self) -> &'static str {
        match self {
            Category::Api1Bola => "API1:2023",
            Category::Api2Authentication => "API2:2023",
            Category::Api3PropertyAuthorization => "API3:2023",
            Category::Api4ResourceConsumption => "API4:2023",
            Category::Api5Bfla => "API5:2023",
            Category::Api7Ssrf => "API7:2023",
            Category::Api8Misconfiguration => "API8:2023",
            Category::Api9Inventory => "API9:2023",
        }
    }

    pub const fn title(self) -> &'static str {
        match self {
            Category::Api1Bola => "Broken Object Level Authorization",
            Category::Api2Authentication => "Broken Authentication",
            Category::Api3PropertyAuthorization => "Broken Object Property Level Authorization",
            Category::Api4ResourceConsumption => "Unrestricted Resource Consumption",
            Category::Api5Bfla => "Broken Function Level Authorization",
            Category::Api7Ssrf => "Server Side Request Forgery",
            Category::Api8Misconfiguration => "Security Misconfiguration",
            Category::Api9Inventory => "Improper Inventory Management",
        }
    }
}

/// Severities and the anomaly score each adds (the Core Rule Set's values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Notice,
    Warning,
    Error,
    Critical,
}

impl Severity {
    pub const fn score(self) -> u32 {
        match self {
            Severity::Notice => 2,
            Severity::Warning => 3,
            Severity::Error => 4,
            Severity::Critical => 5,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Severity::Notice => "notice",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }
}

/// Which family a rule belongs to (the evaluation reports by class).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Sqli,
    Xss,
    PathTraversal,
    CommandInjection,
    TemplateInjection,
    NosqlInjection,
    Ssrf,
    Protocol,
    Authentication,
    Contract,
    Behaviour,
    Anomaly,
}

impl Class {
    pub const fn name(self) -> &'static str {
        match self {
            Class::Sqli => "sqli",
            Class::Xss => "xss",
            Class::PathTraversal => "path_traversal",
            Class::CommandInjection => "command_injection",
            Class::TemplateInjection => "template_injection",
            Class::NosqlInjection => "nosql_injection",
            Class::Ssrf => "ssrf",
            Class::Protocol => "protocol",
            Class::Authentication => "authentication",
            Class::Contract => "contract",
            Class::Behaviour => "behaviour",
            Class::Anomaly => "anomaly",
        }
    }
}

#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct RuleInfo {
    pub id: &'static str,
    pub name: &'static str,
    pub class: Class,
    pub category: Category,
    pub severity: Severity,
    /// Runs from this paranoia level up (1: few false positives, 4: many).
    pub paranoia: u8,
}

macro_rules! rules {
    ($($konst:ident = $id:literal, $name:literal, $class:ident, $category:ident, $severity:ident, $paranoia:literal;)*) => {
        $(pub const $konst: &RuleInfo = &RuleInfo {
            id: $id,
            name: $name,
            class: Class::$class,
            category: Category::$category,
            severity: Severity::$severity,
            paranoia: $paranoia,
        };)*
        /// Every rule, in documentation order.
        pub const ALL: &[&RuleInfo] = &[$($konst),*];
    };
}

rules! {
    SQLI = "sqli", "SQL injection (libinjection)", Sqli, Api8Misconfiguration, Critical, 1;
    XSS = "xss", "Cross-site scripting (libinjection)", Xss, Api8Misconfiguration, Critical, 1;
    PATH_TRAVERSAL = "path-traversal", "Path traversal", PathTraversal, Api8Misconfiguration, Critical, 1;
    PATH_TRAVERSAL_RELATIVE = "path-traversal-relative", "One level of relative path (`../`)", PathTraversal, Api8Misconfiguration, Warning, 2;
    FILE_INCLUSION = "file-inclusion", "Local file inclusion: a system or secret file named", PathTraversal, Api8Misconfiguration, Critical, 1;
    COMMAND_INJECTION = "command-injection", "OS command injection", CommandInjection, Api8Misconfiguration, Critical, 1;
    TEMPLATE_INJECTION = "template-injection", "Server-side template or expression injection", TemplateInjection, Api8Misconfiguration, Critical, 1;
    JNDI_INJECTION = "jndi-injection", "JNDI lookup injection (Log4Shell)", TemplateInjection, Api8Misconfiguration, Critical, 1;
    NOSQL_INJECTION = "nosql-injection", "NoSQL query operator injection", NosqlInjection, Api8Misconfiguration, Critical, 1;
    SSRF_INTERNAL = "ssrf-internal-address", "URL or host pointing at a loopback, private or link-local address", Ssrf, Api7Ssrf, Critical, 1;
    SSRF_METADATA = "ssrf-cloud-metadata", "URL or host pointing at a cloud metadata service", Ssrf, Api7Ssrf, Critical, 1;
    SSRF_SCHEME = "ssrf-scheme", "URL with a non-HTTP scheme (file, gopher, dict, ...)", Ssrf, Api7Ssrf, Critical, 1;
    SMUGGLING = "http-smuggling", "Both Content-Length and Transfer-Encoding", Protocol, Api8Misconfiguration, Critical, 1;
    CONTENT_LENGTH = "http-content-length", "Repeated, conflicting or invalid Content-Length", Protocol, Api8Misconfiguration, Critical, 1;
    TRANSFER_ENCODING = "http-transfer-encoding", "Transfer-Encoding repeated or not ending in chunked", Protocol, Api8Misconfiguration, Error, 1;
    CHUNKING = "http-chunking", "Malformed chunked body", Protocol, Api8Misconfiguration, Error, 1;
    OBS_FOLD = "http-obs-fold", "Header folded over lines (obs-fold)", Protocol, Api8Misconfiguration, Error, 1;
    BAD_VERSION = "http-version", "HTTP version other than 1.0 or 1.1", Protocol, Api8Misconfiguration, Error, 1;
    BAD_HEAD = "http-invalid-request", "Request head that is not valid HTTP/1.x", Protocol, Api8Misconfiguration, Warning, 1;
    UNKNOWN_METHOD = "http-method", "Method outside RFC 9110 and WebDAV", Protocol, Api8Misconfiguration, Warning, 1;
    MISSING_HOST = "http-missing-host", "HTTP/1.1 request without Host", Protocol, Api8Misconfiguration, Warning, 1;
    OVERSIZE_URI = "oversize-uri", "Request URI over the limit", Protocol, Api4ResourceConsumption, Warning, 1;
    OVERSIZE_HEADERS = "oversize-headers", "Request head or header count over the limit", Protocol, Api4ResourceConsumption, Warning, 1;
    INSPECTION_LIMIT = "inspection-limit", "More inputs than inspected (parameters, cookies, body values or JSON depth over the limits)", Protocol, Api4ResourceConsumption, Warning, 1;
    OVERSIZE_BODY = "oversize-body", "Request body over the limit", Protocol, Api4ResourceConsumption, Warning, 1;
    AUTH_MISSING = "auth-missing", "Route that requires credentials called without them", Authentication, Api2Authentication, Error, 1;
    JWT_MALFORMED = "jwt-malformed", "Malformed JWT", Authentication, Api2Authentication, Error, 1;
    JWT_ALG_NONE = "jwt-alg-none", "Unsigned JWT (alg none)", Authentication, Api2Authentication, Critical, 1;
    JWT_EXPIRED = "jwt-expired", "Expired JWT", Authentication, Api2Authentication, Warning, 1;
    JWT_NOT_YET_VALID = "jwt-not-yet-valid", "JWT not valid yet (nbf or iat in the future)", Authentication, Api2Authentication, Warning, 1;
    JWT_SIGNATURE = "jwt-signature", "JWT whose signature does not verify", Authentication, Api2Authentication, Critical, 1;
    CLEARTEXT_CREDENTIALS = "auth-cleartext", "Basic credentials or bearer token over cleartext HTTP", Authentication, Api2Authentication, Notice, 2;
    CREDENTIALS_IN_QUERY = "auth-credentials-in-query", "API key or token in the query string", Authentication, Api2Authentication, Error, 1;
    SCHEMA = "schema-violation", "Request body does not match the route's JSON Schema", Contract, Api8Misconfiguration, Error, 1;
    CONTENT_TYPE = "content-type", "Content-Type the route does not accept", Contract, Api8Misconfiguration, Warning, 1;
    MALFORMED_JSON = "json-malformed", "Body declared as JSON that does not parse", Contract, Api8Misconfiguration, Warning, 1;
    UNKNOWN_ROUTE = "openapi-unknown-route", "Route not in the OpenAPI description", Contract, Api9Inventory, Warning, 1;
    METHOD_NOT_ALLOWED = "openapi-method", "Method the OpenAPI description does not define for the route", Contract, Api9Inventory, Warning, 1;
    PARAMETER = "openapi-parameter", "Parameter missing or not of its declared type", Contract, Api8Misconfiguration, Error, 1;
    ENUMERATION = "bola-enumeration", "One client walking many object ids of a route", Behaviour, Api1Bola, Error, 1;
    BRUTE_FORCE = "auth-brute-force", "Failed logins from one client or IPv6 /64", Behaviour, Api2Authentication, Error, 1;
    SCANNER_AGENT = "scanner-user-agent", "Known security scanner user agent", Behaviour, Api8Misconfiguration, Error, 1;
    NOT_FOUND_BURST = "scanner-404-burst", "Burst of 404 responses to one client", Behaviour, Api9Inventory, Warning, 1;
    ADMIN_ROUTE = "bfla-admin-route", "Admin route from outside the allowed networks or identities", Behaviour, Api5Bfla, Critical, 1;
    OVERSIZE_RESPONSE = "resource-oversize-response", "Response body over the limit", Behaviour, Api4ResourceConsumption, Warning, 1;
    UNBOUNDED_PAGE = "resource-unbounded-page", "Page size parameter over the limit", Behaviour, Api4ResourceConsumption, Warning, 1;
    ANOMALY = "anomaly-score", "Request anomaly score over the threshold", Anomaly, Api8Misconfiguration, Critical, 1;
}

/// The rule with this id.
pub fn find(id: &str) -> Option<&'static RuleInfo> {
    ALL.iter().copied().find(|rule| rule.id == id)
}
