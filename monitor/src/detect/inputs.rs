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
pub struct Input {
    pub location: Location,
    /// Parameter, cookie or header name; JSON path (`user.emails[0]`).
    pub name: String,
    /// Decoded.
    pub value: String,
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

/// Collects a request's inputs. `body` is what was kept of it (maybe a prefix).
pub struct Collector {
    pub inputs: Vec<Input>,
    /// The body parsed as JSON, when it is JSON and whole.
    pub json: Option<serde_json::Value>,
    /// Declared or sniffed JSON that did not parse (whole bodies only).
    pub malformed_json: bool,
}

impl Collector {
    pub fn collect(
        head: &RequestHead,
        headers: &[(&str, &str)],
        body: &[u8],
        body_whole: bool,
    ) -> Self {
        let mut this = Self {
            inputs: Vec::new(),
            json: None,
            malformed_json: false,
        };
        let (path, query_string) = route::split_target(head.target());
        for segment in query::decode_path(path).split('/') {
            if !segment.is_empty() {
                this.push(Location::Path, "", segment);
            }
        }
        for (name, value) in query::pairs(query_string.unwrap_or_default()) {
            this.push(Location::QueryName, "", &name);
            this.push(Location::Query, &name, &value);
        }
        let mut content_type = None;
        for (name, value) in headers {
            match name.to_ascii_lowercase().as_str() {
                "cookie" => {
                    for pair in value.split(';') {
                        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                        this.push(Location::Cookie, name.trim(), &query::decode(value.trim()));
                    }
                }
                "user-agent" | "referer" | "x-forwarded-for" | "x-forwarded-host" => {
                    this.push(Location::Header, name, value);
                }
                "content-type" => content_type = Some(*value),
                _ => {}
            }
        }
        if !body.is_empty() {
            match body_kind(content_type, body) {
                BodyKind::Json if body_whole => match serde_json::from_slice(body) {
                    Ok(json) => {
                        this.walk_json(&json, &mut String::new(), 0);
                        this.json = Some(json);
                    }
                    Err(_) => {
                        this.malformed_json = true;
                        this.push(Location::Json, "", &String::from_utf8_lossy(body));
                    }
                },
                // A cut JSON body cannot parse: its text is still inspected.
                BodyKind::Json | BodyKind::Other => {
                    this.push(Location::Json, "", &String::from_utf8_lossy(body));
                }
                BodyKind::Form => {
                    let text = String::from_utf8_lossy(body);
                    for (name, value) in query::pairs(&text) {
                        this.push(Location::FormName, "", &name);
                        this.push(Location::Form, &name, &value);
                    }
                }
            }
        }
        this
    }

    fn push(&mut self, location: Location, name: &str, value: &str) {
        if self.inputs.len() >= MAX_INPUTS || value.is_empty() {
            return;
        }
        let value = normalise(value);
        self.inputs.push(Input {
            location,
            name: name.to_owned(),
            value: value.into_owned(),
        });
    }

    fn walk_json(&mut self, value: &serde_json::Value, path: &mut String, depth: usize) {
        if depth > MAX_JSON_DEPTH || self.inputs.len() >= MAX_INPUTS {
            return;
        }
        match value {
            serde_json::Value::String(text) => {
                let name = path.clone();
                self.push(Location::Json, &name, text);
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
                    self.push(Location::JsonKey, "", key);
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
