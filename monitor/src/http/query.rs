//! Query strings as applications read them: `&`-separated `name=value` pairs,
//! percent-encoded, `+` for space (HTML forms).

use std::borrow::Cow;

/// One query component decoded (`api%5Fkey` is `api_key`, `a+b` is `a b`); invalid
/// escapes stay as they are, invalid UTF-8 is replaced.
pub fn decode(component: &str) -> Cow<'_, str> {
    percent_decode(component, true)
}

/// A path decoded: like a query component, but `+` is a plus.
pub fn decode_path(path: &str) -> Cow<'_, str> {
    percent_decode(path, false)
}

/// The last part of a parameter's name as applications nest them: `user.password`,
/// `user[password]` and `a[b][password]` all end in `password`.
pub fn leaf_name(name: &str) -> &str {
    let name = name.trim_end_matches(']');
    name.rsplit(['.', '[']).next().unwrap_or(name)
}

pub(crate) fn percent_decode(component: &str, plus_is_space: bool) -> Cow<'_, str> {
    let escaped = component.contains('%') || (plus_is_space && component.contains('+'));
    if !escaped {
        return Cow::Borrowed(component);
    }
    let bytes = component.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(if plus_is_space && bytes[i] == b'+' {
                    b' '
                } else {
                    bytes[i]
                });
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The decoded `(name, value)` pairs of a query string (a name without `=` has an
/// empty value).
pub fn pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) => (decode(name), decode(value)),
            None => (decode(pair), Cow::Borrowed("")),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_names_of_nested_parameters() {
        for (name, leaf) in [
            ("password", "password"),
            ("user.password", "password"),
            ("user[password]", "password"),
            ("a[b][password]", "password"),
            ("a.b]]", "b"),
            ("items[]", ""),
            ("", ""),
        ] {
            assert_eq!(leaf_name(name), leaf, "{name}");
        }
    }

    #[test]
    fn components_decode_like_forms() {
        assert_eq!(decode("api%5Fkey"), "api_key");
        assert_eq!(decode("a+b%20c"), "a b c");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("%C3%A9"), "é");
        assert_eq!(decode("%FF"), "\u{fffd}");
    }

    #[test]
    fn pairs_split_and_decode() {
        let all: Vec<(String, String)> = pairs("a=1&&b&c=x%3Dy&=v")
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect();
        assert_eq!(
            all,
            [("a", "1"), ("b", ""), ("c", "x=y"), ("", "v")].map(|(n, v)| (n.into(), v.into()))
        );
    }
}
