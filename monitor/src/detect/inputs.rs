//! The places of a request an attacker controls, as decoded values: path segments,
//! query and form parameters (names and values), cookies, a few headers, and the
//! strings and keys of a JSON body (other bodies as text).

use std::borrow::Cow;

use super::decode::normalise;
use crate::http::{parse::RequestHead, query, route};

/// JSON nesting followed at most.
const MAX_JSON_DEPTH: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    Path,
    QueryName,
    Query,
    Cookie,
    Header,
    FormName,
    Form,
    JsonKey,
    Json,
    /// A body that is neither JSON nor a form (or JSON cut short), as text.
    Body,
}

impl Location {
    pub const fn name(self) -> &'static str {
        match self {
            Location::Path => "path",
            Location::QueryName => "query_name",
            Location::Query => "query",
            Location::Cookie => "cookie",
            Location::Header => "header",
            Location::FormName => "form_name",
            Location::Form => "form",
            Location::JsonKey => "json_key",
            Location::Json => "json",
            Location::Body => "body",
        }
    }

    /// A parameter's value (not its name, not the path or a header).
    pub const fn is_parameter_value(self) -> bool {
        matches!(self, Location::Query | Location::Form | Location::Json)
    }

    /// Inputs taken per group at most: many parameters must not crowd out the
    /// headers or the body (an attacker would pad a request to hide a payload).
    const fn budget(self) -> (usize, usize) {
        match self {
            Location::Path => (0, 64),
            Location::QueryName | Location::Query => (1, 256),
            Location::Cookie | Location::Header => (2, 64),
            Location::FormName
            | Location::Form
            | Location::JsonKey
            | Location::Json
            | Location::Body => (3, 512),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input<'a> {
    pub location: Location,
    /// Parameter, cookie or header name; JSON path (`user.emails[0]`).
    pub name: Cow<'a, str>,
    /// Decoded; borrowed from the request when nothing needed decoding.
    pub value: Cow<'a, str>,
}

/// How a body is encoded, from its Content-Type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Form,
    /// Images, audio, archives...: not inspected.
    Binary,
    Other,
}

/// The media type of a Content-Type value (`application/json` of
/// `application/json; charset=utf-8`), lowercase.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

pub fn body_kind(content_type: Option<&str>, body: &[u8]) -> BodyKind {
    let media = content_type.map(media_type).unwrap_or_default();
    if media == "application/json" || media.ends_with("+json") {
        return BodyKind::Json;
    }
    if media == "application/x-www-form-urlencoded" {
        return BodyKind::Form;
    }
    const BINARY: &[&str] = &["image/", "audio/", "video/", "font/"];
    const BINARY_APPLICATIONS: &[&str] = &[
        "application/octet-stream",
        "application/pdf",
        "application/zip",
        "application/gzip",
        "application/x-tar",
        "application/protobuf",
        "application/x-protobuf",
        "application/grpc",
        "application/wasm",
    ];
    if BINARY.iter().any(|prefix| media.starts_with(prefix))
        || BINARY_APPLICATIONS.contains(&media.as_str())
    {
        return BodyKind::Binary;
    }
    // Clients that send JSON as text/plain, or with no type at all, still reach a
    // JSON parser behind the API.
    let untyped = media.is_empty() || media == "text/plain";
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{' | b'[') if untyped => BodyKind::Json,
        _ => BodyKind::Other,
    }
}

/// A request body as detections read it.
pub struct Body<'a> {
    pub kind: BodyKind,
    /// The body as text (invalid UTF-8 replaced).
    pub text: Cow<'a, str>,
    /// Parsed, when it is JSON and whole.
    pub json: Option<serde_json::Value>,
    /// Declared or sniffed JSON that did not parse (whole bodies only).
    pub malformed_json: bool,
}

impl<'a> Body<'a> {
    pub fn read(content_type: Option<&str>, body: &'a [u8], whole: bool) -> Self {
        let kind = body_kind(content_type, body);
        let (json, malformed_json) = match kind {
            BodyKind::Json if whole && !body.is_empty() => match serde_json::from_slice(body) {
                Ok(json) => (Some(json), false),
                Err(_) => (None, true),
            },
            _ => (None, false),
        };
        let text = match kind {
            BodyKind::Binary => Cow::Borrowed(""),
            _ => String::from_utf8_lossy(body),
        };
        Self {
            kind,
            text,
            json,
            malformed_json,
        }
    }
}

/// A request's inputs, decoded.
pub struct Inputs<'a> {
    pub list: Vec<Input<'a>>,
    /// Some were left out (a group over its budget, JSON nested too deep).
    pub truncated: bool,
    taken: [usize; 4],
}

impl<'a> Inputs<'a> {
    /// `every_header`: all header values, not only the few attackers usually use
    /// (paranoia 2 and up, as in the Core Rule Set).
    pub fn collect(
        head: &'a RequestHead,
        headers: &[(&'a str, &'a str)],
        body: &'a Body<'a>,
        every_header: bool,
    ) -> Self {
        let mut inputs = Inputs {
            list: Vec::with_capacity(16),
            truncated: false,
            taken: [0; 4],
        };
        let (path, query_string) = route::split_target(head.target());
        let decoded = query::decode_path(path);
        // Segments one by one, and the whole path where it climbs (`/a/../../etc`).
        let whole_too = decoded.contains("..") || decoded.contains('\\');
        match &decoded {
            Cow::Borrowed(path) => {
                for segment in path.split('/') {
                    inputs.push(Location::Path, Cow::Borrowed(""), Cow::Borrowed(segment));
                }
            }
            Cow::Owned(path) => {
                for segment in path.split('/') {
                    let segment = Cow::Owned(segment.to_owned());
                    inputs.push(Location::Path, Cow::Borrowed(""), segment);
                }
            }
        }
        if whole_too {
            inputs.push(Location::Path, Cow::Borrowed(""), decoded);
        }
        for (name, value) in query::pairs(query_string.unwrap_or_default()) {
            inputs.push(Location::QueryName, Cow::Borrowed(""), name.clone());
            inputs.push(Location::Query, name, value);
        }
        for (name, value) in headers {
            if name.eq_ignore_ascii_case("cookie") {
                for (cookie, value) in cookies(value) {
                    inputs.push(
                        Location::Cookie,
                        Cow::Borrowed(cookie),
                        query::decode(value),
                    );
                }
            } else if (every_header && !name.eq_ignore_ascii_case("authorization"))
                || [
                    "user-agent",
                    "referer",
                    "x-forwarded-for",
                    "x-forwarded-host",
                ]
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
            {
                inputs.push(
                    Location::Header,
                    Cow::Borrowed(*name),
                    Cow::Borrowed(*value),
                );
            }
        }
        if !body.text.is_empty() {
            match (&body.json, body.kind) {
                (Some(json), _) => inputs.walk_json(json, &mut String::new(), 0),
                (None, BodyKind::Form) => {
                    for (name, value) in query::pairs(&body.text) {
                        inputs.push(Location::FormName, Cow::Borrowed(""), name.clone());
                        inputs.push(Location::Form, name, value);
                    }
                }
                // Other bodies, and JSON cut by the capture limit or broken: as text.
                (None, _) => {
                    inputs.push(Location::Body, Cow::Borrowed(""), Cow::Borrowed(&body.text))
                }
            }
        }
        inputs
    }

    fn push(&mut self, location: Location, name: Cow<'a, str>, value: Cow<'a, str>) {
        if value.is_empty() {
            return;
        }
        let (group, budget) = location.budget();
        if self.taken[group] >= budget {
            self.truncated = true;
            return;
        }
        self.taken[group] += 1;
        let value = match normalise(&value) {
            Cow::Borrowed(_) => value,
            Cow::Owned(decoded) => Cow::Owned(decoded),
        };
        self.list.push(Input {
            location,
            name,
            value,
        });
    }

    fn walk_json(&mut self, value: &'a serde_json::Value, path: &mut String, depth: usize) {
        if depth > MAX_JSON_DEPTH {
            self.truncated = true;
            return;
        }
        match value {
            serde_json::Value::String(text) => {
                self.push(
                    Location::Json,
                    Cow::Owned(path.clone()),
                    Cow::Borrowed(text),
                );
            }
            serde_json::Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{index}]"));
                    self.walk_json(item, path, depth + 1);
                    path.truncate(len);
                }
            }
            serde_json::Value::Object(map) => {
                for (key, item) in map {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                    self.push(Location::JsonKey, Cow::Borrowed(""), Cow::Borrowed(key));
                    self.walk_json(item, path, depth + 1);
                    path.truncate(len);
                }
            }
            _ => {}
        }
    }
}

/// The `name=value` pairs of a Cookie header, trimmed.
pub fn cookies(header: &str) -> impl Iterator<Item = (&str, &str)> {
    header.split(';').map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (name.trim(), value.trim())
    })
}

/// A value as evidence in an event: short, on one line.
pub fn evidence(value: &str) -> Cow<'_, str> {
    const MAX: usize = 120;
    if value.len() <= MAX && !value.contains(['\n', '\r']) {
        return Cow::Borrowed(value);
    }
    let cut: String = value.chars().take(MAX).collect();
    Cow::Owned(cut.replace(['\n', '\r'], " "))
}
