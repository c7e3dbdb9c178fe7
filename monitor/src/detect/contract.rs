//! The API's contract: per-route JSON Schemas for request bodies with the content
//! types they accept, and an OpenAPI 3 description (routes, methods, parameter types,
//! body schemas) that requests are checked against.

use std::{collections::HashMap, path::Path};

use jsonschema::{Draft, Validator};
use serde_json::Value;

use super::{
    DetectError,
    catalog::{self, RuleInfo},
    config::SchemaDoc,
    inputs::media_type,
};
use crate::http::query;

/// `$ref`s followed into one schema at most (recursive schemas stop there).
const MAX_REF_DEPTH: usize = 16;

/// What the contract says about one request body.
struct BodySpec {
    required: bool,
    /// Media types accepted, lowercase (empty: any).
    content_types: Vec<String>,
    schema: Option<Validator>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ParamIn {
    Path,
    Query,
    Header,
}

struct Param {
    name: String,
    place: ParamIn,
    required: bool,
    /// The declared `type`, for reading a text value as JSON.
    kind: String,
    schema: Option<Validator>,
}

struct Operation {
    params: Vec<Param>,
    body: Option<BodySpec>,
}

enum Segment {
    Literal(String),
    Param(String),
}

struct PathSpec {
    template: String,
    segments: Vec<Segment>,
    literals: usize,
    operations: HashMap<String, Operation>,
}

struct RouteSchema {
    route: String,
    methods: Vec<String>,
    body: BodySpec,
}

/// What a request offers to the contract checks.
pub struct Call<'a> {
    pub method: &'a str,
    /// Percent-decoded, normalised.
    pub path: &'a str,
    pub route: &'a str,
    pub query: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub content_type: Option<&'a str>,
    /// A body was sent (whole or not).
    pub has_body: bool,
    /// The body as JSON, when it is JSON and whole.
    pub json: Option<&'a Value>,
}

#[derive(Default)]
pub struct Contract {
    schemas: Vec<RouteSchema>,
    paths: Vec<PathSpec>,
}

fn read_document(path: &Path) -> Result<Value, DetectError> {
    let text = std::fs::read_to_string(path).map_err(|source| DetectError::Read {
        path: path.to_owned(),
        source,
    })?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    if yaml {
        serde_yaml::from_str(&text)
            .map_err(|e| DetectError::Invalid(format!("{}: {e}", path.display())))
    } else {
        serde_json::from_str(&text)
            .map_err(|e| DetectError::Invalid(format!("{}: {e}", path.display())))
    }
}

fn compile(schema: &Value, draft: Draft, place: &str) -> Result<Validator, DetectError> {
    jsonschema::options()
        .with_draft(draft)
        .build(schema)
        .map_err(|e| DetectError::Invalid(format!("{place}: invalid schema: {}", e.masked())))
}

/// Replaces local `$ref`s (`#/components/schemas/User`) with what they point at,
/// so each schema compiles on its own.
fn inline_refs(value: &Value, root: &Value, depth: usize) -> Value {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref")
                && let Some(pointer) = reference.strip_prefix('#')
            {
                return match root.pointer(pointer) {
                    Some(target) if depth < MAX_REF_DEPTH => inline_refs(target, root, depth + 1),
                    // Deeper than this, anything goes: recursion is not followed.
                    _ => Value::Object(serde_json::Map::new()),
                };
            }
            let mut inlined: serde_json::Map<String, Value> = map
                .iter()
                .map(|(k, v)| (k.clone(), inline_refs(v, root, depth)))
                .collect();
            // OpenAPI 3.0's `nullable: true` is JSON Schema's `null` among the types.
            if inlined.remove("nullable") == Some(Value::Bool(true))
                && let Some(Value::String(kind)) = inlined.get("type").cloned()
            {
                inlined.insert("type".into(), serde_json::json!([kind, "null"]));
            }
            Value::Object(inlined)
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| inline_refs(v, root, depth)).collect())
        }
        other => other.clone(),
    }
}

impl Contract {
    pub fn new(schemas: &[SchemaDoc], openapi: Option<&Path>) -> Result<Self, DetectError> {
        let mut contract = Contract::default();
        for doc in schemas {
            let schema = read_document(&doc.file)?;
            let validator = compile(&schema, Draft::Draft202012, &doc.file.display().to_string())?;
            let methods = if doc.methods.is_empty() {
                vec!["POST".into(), "PUT".into(), "PATCH".into()]
            } else {
                doc.methods.iter().map(|m| m.to_ascii_uppercase()).collect()
            };
            let content_types = if doc.content_types.is_empty() {
                vec!["application/json".into()]
            } else {
                doc.content_types.iter().map(|c| media_type(c)).collect()
            };
            contract.schemas.push(RouteSchema {
                route: doc.route.clone(),
                methods,
                body: BodySpec {
                    required: false,
                    content_types,
                    schema: Some(validator),
                },
            });
        }
        if let Some(path) = openapi {
            contract.paths = load_openapi(path)?;
        }
        Ok(contract)
    }

    /// Whether an OpenAPI description is loaded (its checks read the path).
    pub fn has_routes(&self) -> bool {
        !self.paths.is_empty()
    }

    /// Route templates of the OpenAPI description (for metric labels).
    pub fn templates(&self) -> Vec<String> {
        self.paths.iter().map(|p| p.template.clone()).collect()
    }

    pub fn check(&self, call: &Call<'_>, out: &mut Vec<(&'static RuleInfo, String)>) {
        for schema in &self.schemas {
            if schema.route == call.route && schema.methods.iter().any(|m| m == call.method) {
                check_body(&schema.body, call, out);
            }
        }
        if self.paths.is_empty() {
            return;
        }
        let segments: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
        let matched = self
            .paths
            .iter()
            .filter(|spec| spec.segments.len() == segments.len())
            .filter(|spec| {
                spec.segments.iter().zip(&segments).all(|(s, v)| match s {
                    Segment::Literal(l) => l == v,
                    Segment::Param(_) => !v.is_empty(),
                })
            })
            .max_by_key(|spec| spec.literals);
        let Some(spec) = matched else {
            out.push((catalog::UNKNOWN_ROUTE, call.path.to_owned()));
            return;
        };
        // CORS preflights are the browser's, and HEAD is GET without the body.
        let method = match call.method {
            "OPTIONS" => return,
            "HEAD" if !spec.operations.contains_key("HEAD") => "GET",
            other => other,
        };
        let Some(operation) = spec.operations.get(method) else {
            out.push((
                catalog::METHOD_NOT_ALLOWED,
                format!("{} {}", call.method, spec.template),
            ));
            return;
        };
        for param in &operation.params {
            let value = match param.place {
                ParamIn::Path => spec
                    .segments
                    .iter()
                    .zip(&segments)
                    .find(|(s, _)| matches!(s, Segment::Param(n) if *n == param.name))
                    .map(|(_, v)| std::borrow::Cow::Borrowed(*v)),
                ParamIn::Query => query::pairs(call.query)
                    .find(|(n, _)| *n == param.name)
                    .map(|(_, v)| v),
                ParamIn::Header => call
                    .headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(&param.name))
                    .map(|(_, v)| std::borrow::Cow::Borrowed(*v)),
            };
            match value {
                None if param.required => {
                    out.push((catalog::PARAMETER, format!("{} missing", param.name)));
                }
                None => {}
                Some(text) => {
                    let Some(schema) = &param.schema else {
                        continue;
                    };
                    let typed = typed_value(&text, &param.kind);
                    if let Some(error) = schema.iter_errors(&typed).next() {
                        out.push((
                            catalog::PARAMETER,
                            format!("{}: {}", param.name, error.masked()),
                        ));
                    }
                }
            }
        }
        if let Some(body) = &operation.body {
            check_body(body, call, out);
        }
    }
}

/// A parameter's text as the JSON value its declared type means (`"42"` is 42 for an
/// integer); text that does not read as that type stays text, and fails validation.
fn typed_value(text: &str, kind: &str) -> Value {
    match kind {
        "integer" | "number" | "boolean" => {
            serde_json::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.into()))
        }
        // The default OpenAPI style for query arrays is `form`, exploded or not:
        // `a,b` here (repeated parameters are read one by one).
        "array" => Value::Array(
            text.split(',')
                .map(|item| {
                    serde_json::from_str::<Value>(item)
                        .ok()
                        .filter(|v| v.is_number() || v.is_boolean())
                        .unwrap_or_else(|| Value::String(item.into()))
                })
                .collect(),
        ),
        _ => Value::String(text.into()),
    }
}

fn check_body(spec: &BodySpec, call: &Call<'_>, out: &mut Vec<(&'static RuleInfo, String)>) {
    if !call.has_body {
        if spec.required {
            out.push((catalog::SCHEMA, "request body required".into()));
        }
        return;
    }
    let media = call.content_type.map(media_type).unwrap_or_default();
    let accepted = |declared: &String| {
        declared == &media
            || declared == "*/*"
            || declared
                .strip_suffix('*')
                .is_some_and(|prefix| prefix.ends_with('/') && media.starts_with(prefix))
    };
    if !spec.content_types.is_empty() && !spec.content_types.iter().any(accepted) {
        out.push((catalog::CONTENT_TYPE, media));
        return;
    }
    if let (Some(schema), Some(json)) = (&spec.schema, call.json) {
        let errors: Vec<String> = schema
            .iter_errors(json)
            .take(3)
            .map(|e| format!("{} at {}", e.masked(), e.instance_path()))
            .collect();
        if !errors.is_empty() {
            out.push((catalog::SCHEMA, errors.join("; ")));
        }
    }
}

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn load_openapi(path: &Path) -> Result<Vec<PathSpec>, DetectError> {
    let doc = read_document(path)?;
    let place = path.display().to_string();
    let version = doc
        .get("openapi")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !version.starts_with('3') {
        return Err(DetectError::Invalid(format!(
            "{place}: not an OpenAPI 3 document (openapi: {version:?})"
        )));
    }
    // 3.0 schemas are close to draft 4 (boolean exclusiveMinimum); 3.1 is 2020-12.
    let draft = if version.starts_with("3.0") {
        Draft::Draft4
    } else {
        Draft::Draft202012
    };
    let base = doc
        .pointer("/servers/0/url")
        .and_then(Value::as_str)
        .and_then(|url| {
            url::Url::parse(url)
                .or_else(|_| url::Url::parse("http://h").and_then(|b| b.join(url)))
                .ok()
        })
        .map(|url| url.path().trim_end_matches('/').to_owned())
        .unwrap_or_default();
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return Err(DetectError::Invalid(format!("{place}: no paths")));
    };
    let mut specs = Vec::new();
    for (template, item) in paths {
        let item = inline_refs(item, &doc, 0);
        let template = format!("{base}{template}");
        let segments: Vec<Segment> = template
            .trim_start_matches('/')
            .split('/')
            .map(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => Segment::Param(name.to_owned()),
                    None => Segment::Literal(s.to_owned()),
                },
            )
            .collect();
        let shared = item.get("parameters").cloned().unwrap_or(Value::Null);
        let mut operations = HashMap::new();
        for method in METHODS {
            let Some(op) = item.get(*method) else {
                continue;
            };
            let at = format!("{place}: {} {template}", method.to_ascii_uppercase());
            let mut params = Vec::new();
            let declared = shared.as_array().into_iter().flatten().chain(
                op.get("parameters")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten(),
            );
            for param in declared {
                let (Some(name), Some(place_in)) = (
                    param.get("name").and_then(Value::as_str),
                    param.get("in").and_then(Value::as_str),
                ) else {
                    continue;
                };
                let place_in = match place_in {
                    "path" => ParamIn::Path,
                    "query" => ParamIn::Query,
                    "header" => ParamIn::Header,
                    _ => continue,
                };
                // Operation-level parameters override path-level ones of that name.
                params.retain(|p: &Param| !(p.name == name && p.place == place_in));
                let schema = param.get("schema");
                params.push(Param {
                    name: name.to_owned(),
                    place: place_in,
                    required: param
                        .get("required")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    kind: schema
                        .and_then(|s| s.get("type"))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    schema: schema
                        .map(|s| compile(s, draft, &format!("{at} parameter {name}")))
                        .transpose()?,
                });
            }
            let body = match op.get("requestBody") {
                Some(body) => {
                    let content = body.get("content").and_then(Value::as_object);
                    let json_schema = content
                        .and_then(|c| c.get("application/json"))
                        .and_then(|m| m.get("schema"));
                    Some(BodySpec {
                        required: body
                            .get("required")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                        content_types: content
                            .map(|c| c.keys().map(|k| media_type(k)).collect())
                            .unwrap_or_default(),
                        schema: json_schema
                            .map(|s| compile(s, draft, &format!("{at} requestBody")))
                            .transpose()?,
                    })
                }
                None => None,
            };
            operations.insert(method.to_ascii_uppercase(), Operation { params, body });
        }
        let literals = segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        specs.push(PathSpec {
            template,
            segments,
            literals,
            operations,
        });
    }
    Ok(specs)
}
