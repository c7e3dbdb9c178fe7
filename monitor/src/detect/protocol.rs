//! Protocol abuse: request-smuggling signs, malformed heads, unknown methods,
//! missing Host, and sizes over the configured limits.

use super::{
    catalog::{self, RuleInfo},
    config::LimitsDoc,
};
use crate::http::parse::{ParseErrorKind, RequestHead, STANDARD_METHODS};

/// WebDAV's methods, which many APIs still serve besides the standard ones.
const WEBDAV_METHODS: &[&str] = &[
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "REPORT",
    "SEARCH",
    "MKCALENDAR",
];

/// What a request's head shows.
pub fn scan_head(
    head: &RequestHead,
    limits: &LimitsDoc,
    out: &mut Vec<(&'static RuleInfo, String)>,
) {
    let framing = head.framing();
    if framing.length_and_encoding {
        out.push((
            catalog::SMUGGLING,
            "Content-Length with Transfer-Encoding".into(),
        ));
    }
    if framing.repeated_length {
        out.push((catalog::CONTENT_LENGTH, "Content-Length repeated".into()));
    }
    if framing.odd_encoding {
        out.push((
            catalog::TRANSFER_ENCODING,
            "Transfer-Encoding not ending in chunked, or repeated".into(),
        ));
    }
    let method = head.method();
    if !STANDARD_METHODS.contains(&method) && !WEBDAV_METHODS.contains(&method) {
        out.push((catalog::UNKNOWN_METHOD, method.to_owned()));
    }
    if head.version() == 1 && head.host().is_none() {
        out.push((catalog::MISSING_HOST, String::new()));
    }
    let target = head.target().len();
    if target > limits.max_uri_bytes {
        out.push((catalog::OVERSIZE_URI, format!("{target} bytes")));
    }
    let headers = head.header_count();
    if headers > usize::from(limits.max_headers) {
        out.push((catalog::OVERSIZE_HEADERS, format!("{headers} headers")));
    } else if head.raw().len() > limits.max_head_bytes {
        out.push((
            catalog::OVERSIZE_HEADERS,
            format!("{} bytes of head", head.raw().len()),
        ));
    }
    if let Some(length) = head.content_length()
        && length > limits.max_body_bytes
    {
        out.push((catalog::OVERSIZE_BODY, format!("Content-Length {length}")));
    }
}

/// What bytes the parser refused in a request say about their sender.
pub fn rule_of_problem(kind: ParseErrorKind) -> Option<&'static RuleInfo> {
    match kind {
        ParseErrorKind::InvalidContentLength => Some(catalog::CONTENT_LENGTH),
        ParseErrorKind::InvalidChunk => Some(catalog::CHUNKING),
        ParseErrorKind::ObsFold => Some(catalog::OBS_FOLD),
        ParseErrorKind::InvalidVersion => Some(catalog::BAD_VERSION),
        ParseErrorKind::InvalidHead => Some(catalog::BAD_HEAD),
        ParseErrorKind::HeadTooLarge => Some(catalog::OVERSIZE_HEADERS),
        // Lost bytes are the capture's doing, not the client's.
        ParseErrorKind::Gap => None,
    }
}
