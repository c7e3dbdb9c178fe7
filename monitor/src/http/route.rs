//! Route templates: bounded metric labels from raw paths. Numeric, UUID, hex and long
//! opaque segments become `{id}`; configured templates win over the heuristic.

/// Segments longer than this that mix letters and digits are taken for opaque ids.
const OPAQUE_MIN_LEN: usize = 20;
/// Paths deeper than this are cut, to bound the label space further.
const MAX_SEGMENTS: usize = 8;

fn is_uuid(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn is_id(segment: &str) -> bool {
    if segment.is_empty() {
        return false;
    }
    // Words (`users`, `orders`) are the common case: without a digit only a UUID of
    // hex letters could be an id.
    let digits = segment.bytes().filter(u8::is_ascii_digit).count();
    if digits == 0 {
        return is_uuid(segment);
    }
    let all_digits = digits == segment.len();
    let hex = segment.len() >= 8 && segment.bytes().all(|b| b.is_ascii_hexdigit());
    let opaque = segment.len() >= OPAQUE_MIN_LEN
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=');
    all_digits || hex || opaque || is_uuid(segment)
}

/// Operator-configured templates (`/users/{id}/posts`), tried before the heuristic.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    templates: Vec<Vec<String>>,
}

impl Routes {
    pub fn new(templates: &[String]) -> Self {
        Self {
            templates: templates
                .iter()
                .map(|t| {
                    t.trim_start_matches('/')
                        .split('/')
                        .map(str::to_owned)
                        .collect()
                })
                .collect(),
        }
    }

    /// The template for a request target (path and query).
    pub fn template(&self, target: &str) -> String {
        let path = path_of(target);
        let segments = || path.trim_start_matches('/').split('/');
        for template in &self.templates {
            if template.len() == segments().count()
                && template.iter().zip(segments()).all(|(t, s)| {
                    // A parameter never stands for a dot segment or a path parameter:
                    // `/snippets/..` is not `/snippets/{id}` (its settings must not apply).
                    (t.starts_with('{')
                        && t.ends_with('}')
                        && !matches!(s, "." | "..")
                        && !s.contains(';'))
                        || t == s
                })
            {
                return format!("/{}", template.join("/"));
            }
        }
        let mut out = String::with_capacity(path.len() + 1);
        for (index, segment) in segments().enumerate() {
            if index == MAX_SEGMENTS {
                out.push_str("/...");
                break;
            }
            out.push('/');
            out.push_str(if is_id(segment) { "{id}" } else { segment });
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn paths_normalise_like_servers_resolve_them() {
        for (target, path) in [
            ("/admin", "/admin"),
            ("//%61dmin/./x/../", "/admin/"),
            ("/a/b/../../admin?x=1", "/admin"),
            ("http://victim.example/admin/users", "/admin/users"),
            ("https://h", "/"),
            ("/%2e%2e/admin", "/admin"),
            ("/a+b", "/a+b"),
            ("", "/"),
        ] {
            assert_eq!(normalised_path(target), path, "{target}");
        }
        assert_eq!(split_target("/a?x=1#frag"), ("/a", Some("x=1")));
        assert_eq!(split_target("http://h:8080/a/b?q"), ("/a/b", Some("q")));
        assert_eq!(split_target("/a#f?x"), ("/a", None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_placeholders() {
        let routes = Routes::default();
        for (target, template) in [
            ("/", "/"),
            ("/users/42", "/users/{id}"),
            ("/users/42/orders/7?page=2", "/users/{id}/orders/{id}"),
            ("/items/123e4567-e89b-12d3-a456-426614174000", "/items/{id}"),
            ("/blobs/deadbeef01", "/blobs/{id}"),
            ("/t/aGVsbG8gd29ybGQgdGhpcyBpcyAx", "/t/{id}"),
            ("/search", "/search"),
            ("/api/v1/users", "/api/v1/users"),
            ("/a/b/c/d/e/f/g/h/i/j", "/a/b/c/d/e/f/g/h/..."),
            ("http://example.com/x/9", "/x/{id}"),
        ] {
            assert_eq!(routes.template(target), template, "{target}");
        }
    }

    #[test]
    fn configured_templates_win() {
        let routes = Routes::new(&["/users/{name}/profile".to_owned()]);
        assert_eq!(
            routes.template("/users/alice/profile"),
            "/users/{name}/profile"
        );
        assert_eq!(routes.template("/users/alice/other"), "/users/alice/other");
        assert_eq!(
            routes.template("/users/../profile"),
            "/users/../profile",
            "not a name"
        );
        assert_eq!(routes.template("/users/a;x/profile"), "/users/a;x/profile");
    }
}

/// A request target's path and query: without fragment, and without scheme and
/// authority in absolute form (`http://host/a?x` is `/a` and `x`).
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    let target = target.split('#').next().unwrap_or("");
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    // Origin form (`/...`) is nearly every request; only absolute form has a scheme.
    if path.starts_with('/') {
        return (path, query);
    }
    let path = match path.find("://") {
        Some(scheme_end) => {
            let rest = &path[scheme_end + 3..];
            rest.find('/').map_or("/", |slash| &rest[slash..])
        }
        None => path,
    };
    (path, query)
}

/// The path of a request target (see `split_target`).
pub fn path_of(target: &str) -> &str {
    split_target(target).0
}

/// The path as the application will see it, for matching: percent-decoded, repeated
/// slashes collapsed, `.` and `..` segments resolved (`//%61dmin/./x/../` is `/admin/`).
pub fn normalised_path(target: &str) -> String {
    let decoded = super::query::decode_path(path_of(target));
    let mut segments: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    out
}
