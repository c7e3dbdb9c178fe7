//! The places of a request an attacker controls, as decoded values: path segments,
//! query and form parameters (names and values), cookies, a few headers, and the
//! strings and keys of a JSON body.

use std::borrow::Cow;

use super::decode::normalise;
use crate::http::{parse::RequestHead, query, route};

/// Values taken from one request at most (a body with more is inspected in part).
const MAX_INPUTS: usize = 512;
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
        }
    }

    /// A parameter's value (not its name, not the path or a header).
    pub const fn is_parameter_value(self) -> bool {
        matches!(self, Location::Query | Location::Form | Location::Json)
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
    // Clients that send JSON as text/plain (or no type at all) still reach a parser.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{' | b'[') if !media.starts_with("multipart/") => BodyKind::Json,
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
        Self {
            kind,
            text: String::from_utf8_lossy(body),
            json,
            malformed_json,
        }
    }
}

/// A request's inputs, decoded.
pub fn collect<'a>(
    head: &'a RequestHead,
    headers: &[(&'a str, &'a str)],
    body: &'a Body<'a>,
) -> Vec<Input<'a>> {
    let mut inputs = Inputs(Vec::with_capacity(16));
    let (path, query_string) = route::split_target(head.target());
    match query::decode_path(path) {
        Cow::Borrowed(path) => {
            for segment in path.split('/') {
                inputs.push(Location::Path, Cow::Borrowed(""), Cow::Borrowed(segment));
            }
        }
        Cow::Owned(path) => {
            for segment in path.split('/') {
                inputs.push(
                    Location::Path,
                    Cow::Borrowed(""),
                    Cow::Owned(segment.to_owned()),
                );
            }
        }
    }
    for (name, value) in query::pairs(query_string.unwrap_or_default()) {
        inputs.push(Location::QueryName, Cow::Borrowed(""), name.clone());
        inputs.push(Location::Query, name, value);
    }
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("cookie") {
            for pair in value.split(';') {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                inputs.push(
                    Location::Cookie,
                    Cow::Borrowed(name.trim()),
                    query::decode(value.trim()),
                );
            }
        } else if [
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
            (None, _) => inputs.push(Location::Json, Cow::Borrowed(""), Cow::Borrowed(&body.text)),
        }
    }
    inputs.0
}

struct Inputs<'a>(Vec<Input<'a>>);

impl<'a> Inputs<'a> {
    fn push(&mut self, location: Location, name: Cow<'a, str>, value: Cow<'a, str>) {
        if self.0.len() >= MAX_INPUTS || value.is_empty() {
            return;
        }
        let value = match normalise(&value) {
            Cow::Borrowed(_) => value,
            Cow::Owned(decoded) => Cow::Owned(decoded),
        };
        self.0.push(Input {
            location,
            name,
            value,
        });
    }

    fn walk_json(&mut self, value: &'a serde_json::Value, path: &mut String, depth: usize) {
        if depth > MAX_JSON_DEPTH || self.0.len() >= MAX_INPUTS {
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

/// A value as evidence in an event: short, on one line.
pub fn evidence(value: &str) -> Cow<'_, str> {
    const MAX: usize = 120;
    if value.len() <= MAX && !value.contains(['\n', '\r']) {
        return Cow::Borrowed(value);
    }
    let cut: String = value.chars().take(MAX).collect();
    Cow::Owned(cut.replace(['\n', '\r'], " "))
}
