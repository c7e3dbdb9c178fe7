//! Route templates: bounded metric labels from raw paths. Numeric, UUID, hex and long
//! opaque segments become `{id}`; configured templates win over the heuristic.

use std::{hash::BuildHasher as _, sync::Arc};

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
    // One pass: digits, and whether every byte is hex or an opaque-token byte.
    let (mut digits, mut hex, mut opaque) = (0, true, true);
    for b in segment.bytes() {
        digits += usize::from(b.is_ascii_digit());
        hex &= b.is_ascii_hexdigit();
        opaque &= b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=');
    }
    // Words (`users`, `orders`) are the common case: without a digit only a UUID of
    // hex letters could be an id.
    if digits == 0 {
        return is_uuid(segment);
    }
    let all_digits = digits == segment.len();
    all_digits
        || (hex && segment.len() >= 8)
        || (opaque && segment.len() >= OPAQUE_MIN_LEN)
        || is_uuid(segment)
}

/// Distinct templates kept shared at most; past this the cache starts over (templates
/// are bounded by design, this bounds the cache whatever the traffic).
const MAX_INTERNED: usize = 4096;

/// Slots of the cache of recent paths' routes (direct-mapped by the path's hash).
const RECENT_SLOTS: usize = 512;
/// Longer paths and templates are neither cached nor shared: both caches stay small
/// (a few MiB at most) whatever clients send.
const MAX_SHARED_LEN: usize = 256;

/// Operator-configured templates (`/users/{id}/posts`), tried before the heuristic.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    templates: Vec<Vec<String>>,
    /// Templates handed out, shared: a request's route costs no allocation once its
    /// template was seen.
    interned: foldhash::HashSet<Arc<str>>,
    /// Recent paths and their routes: hot endpoints are templated once, not per
    /// request. A collision only replaces a slot.
    recent: Vec<Option<(Box<str>, Arc<str>)>>,
    hasher: foldhash::fast::RandomState,
    scratch: String,
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
            ..Self::default()
        }
    }

    /// The template for a request target (path and query).
    pub fn template(&self, target: &str) -> String {
        let mut out = String::new();
        self.write_template(path_of(target), &mut out);
        out
    }

    /// The template for a request target, shared with earlier requests of the route.
    pub fn route(&mut self, target: &str) -> Arc<str> {
        let path = path_of(target);
        if path.len() > MAX_SHARED_LEN {
            return self.template(path).into();
        }
        if self.recent.is_empty() {
            self.recent.resize(RECENT_SLOTS, None);
        }
        let slot = self.hasher.hash_one(path) as usize % RECENT_SLOTS;
        if let Some((seen, route)) = &self.recent[slot]
            && **seen == *path
        {
            return route.clone();
        }
        let route = self.template_shared(path);
        self.recent[slot] = Some((path.into(), route.clone()));
        route
    }

    /// The template of `path`, one shared allocation per template.
    fn template_shared(&mut self, path: &str) -> Arc<str> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        self.write_template(path, &mut scratch);
        let route = match self.interned.get(scratch.as_str()) {
            Some(route) => route.clone(),
            None if scratch.len() > MAX_SHARED_LEN => scratch.as_str().into(),
            None => {
                if self.interned.len() >= MAX_INTERNED {
                    self.interned.clear();
                }
                let route: Arc<str> = scratch.as_str().into();
                self.interned.insert(route.clone());
                route
            }
        };
        self.scratch = scratch;
        route
    }

    /// Writes the template of `path` (a target's path, see `path_of`) to `out`.
    fn write_template(&self, path: &str, out: &mut String) {
        let segments = || path.trim_start_matches('/').split('/');
        let count = if self.templates.is_empty() {
            0
        } else {
            segments().count()
        };
        for template in &self.templates {
            if template.len() == count
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
                for part in template {
                    out.push('/');
                    out.push_str(part);
                }
                return;
            }
        }
        // Byte scans rather than `split`: this runs once per request.
        let mut rest = path.trim_start_matches('/');
        for index in 0.. {
            if index == MAX_SEGMENTS {
                out.push_str("/...");
                break;
            }
            let end = memchr::memchr(b'/', rest.as_bytes());
            let segment = end.map_or(rest, |end| &rest[..end]);
            out.push('/');
            out.push_str(if is_id(segment) { "{id}" } else { segment });
            match end {
                Some(end) => rest = &rest[end + 1..],
                None => break,
            }
        }
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
    fn routes_are_shared_and_the_cache_is_bounded() {
        let mut routes = Routes::default();
        let first = routes.route("/users/1?x=1");
        let second = routes.route("/users/2");
        assert_eq!(&*first, "/users/{id}");
        assert!(Arc::ptr_eq(&first, &second), "one allocation per template");
        for n in 0..MAX_INTERNED + 10 {
            let route = routes.route(&format!("/w{n}x"));
            assert_eq!(*route, format!("/w{n}x"), "a word, not an id");
            assert!(routes.interned.len() <= MAX_INTERNED);
        }
        for (target, template) in [("/", "/"), ("/a/12/b", "/a/{id}/b")] {
            assert_eq!(&*routes.route(target), template);
        }
        // Long paths are answered but kept in neither cache.
        let long = format!("/{}", "x".repeat(MAX_SHARED_LEN));
        let (cached, shared) = (
            routes.recent.iter().flatten().count(),
            routes.interned.len(),
        );
        assert_eq!(*routes.route(&long), long);
        assert_eq!(
            (
                routes.recent.iter().flatten().count(),
                routes.interned.len()
            ),
            (cached, shared)
        );
        // Recent paths are cached: more paths than slots, each asked twice, always
        // get their own template (a slot holds one path; collisions replace it).
        let mut routes = Routes::new(&["/files/{name}".to_owned()]);
        for round in 0..2 {
            for n in 0..RECENT_SLOTS * 2 {
                let target = format!("/v{}/{n}/x{}?q={round}", n % 7, n % 3);
                assert_eq!(*routes.route(&target), routes.template(&target), "{target}");
            }
            assert_eq!(&*routes.route("/files/a.txt"), "/files/{name}");
            assert_eq!(&*routes.route("http://h/files/b"), "/files/{name}");
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
    // One scan for the end of the path; a query ends at a fragment.
    let (path, query) = match memchr::memchr2(b'?', b'#', target.as_bytes()) {
        Some(end) if target.as_bytes()[end] == b'?' => {
            let rest = &target[end + 1..];
            let query_end = memchr::memchr(b'#', rest.as_bytes()).unwrap_or(rest.len());
            (&target[..end], Some(&rest[..query_end]))
        }
        Some(end) => (&target[..end], None),
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
