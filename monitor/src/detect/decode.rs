//! Undoes the encodings attackers hide payloads in, before any detector looks:
//! percent-encoding (repeated, for double encoding), HTML character references,
//! and JavaScript-style `\uXXXX` / `\xXX` escapes. JSON escapes are undone by the
//! JSON parser itself.

use std::borrow::Cow;

use crate::http::query::percent_decode;

/// Rounds of percent-decoding at most (`%25252e` is three).
const PERCENT_ROUNDS: usize = 3;

/// `value` as the application behind the API may finally see it.
pub fn normalise(value: &str) -> Cow<'_, str> {
    let mut current = Cow::Borrowed(value);
    for _ in 0..PERCENT_ROUNDS {
        if !has_percent_escape(&current) {
            break;
        }
        current = Cow::Owned(percent_decode(&current, false).into_owned());
    }
    if current.contains('&')
        && let Cow::Owned(decoded) = html_entities(&current)
    {
        current = Cow::Owned(decoded);
    }
    if current.contains('\\')
        && let Cow::Owned(decoded) = script_escapes(&current)
    {
        current = Cow::Owned(decoded);
    }
    current
}

fn has_percent_escape(text: &str) -> bool {
    text.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

/// Named references attackers use, and numeric ones (`&#60;`, `&#x3c;`, with or
/// without the semicolon, as browsers accept them).
fn html_entities(text: &str) -> Cow<'_, str> {
    const NAMED: &[(&str, char)] = &[
        ("lt", '<'),
        ("gt", '>'),
        ("quot", '"'),
        ("apos", '\''),
        ("amp", '&'),
        ("sol", '/'),
        ("bsol", '\\'),
        ("lpar", '('),
        ("rpar", ')'),
        ("colon", ':'),
        ("semi", ';'),
        ("equals", '='),
        ("tab", '\t'),
        ("newline", '\n'),
        ("nbsp", ' '),
    ];
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let decoded = if let Some(numeric) = after.strip_prefix('#') {
            let (digits, radix, skip) = match numeric.strip_prefix(['x', 'X']) {
                Some(hex) => (hex, 16, 2),
                None => (numeric, 10, 1),
            };
            let len = digits
                .bytes()
                .take_while(|b| (*b as char).is_digit(radix))
                .count()
                .min(8);
            (len > 0)
                .then(|| u32::from_str_radix(&digits[..len], radix).ok())
                .flatten()
                .and_then(char::from_u32)
                .map(|c| {
                    let semi = usize::from(digits[len..].starts_with(';'));
                    (c, skip + len + semi)
                })
        } else {
            NAMED.iter().find_map(|(name, c)| {
                let tail = after.get(..name.len())?;
                tail.eq_ignore_ascii_case(name).then(|| {
                    let semi = usize::from(after[name.len()..].starts_with(';'));
                    (*c, name.len() + semi)
                })
            })
        };
        match decoded {
            Some((c, used)) => {
                out.push(c);
                rest = &after[used..];
                changed = true;
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    if !changed {
        return Cow::Borrowed(text);
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// `\u003c` and `\x3c` escapes (JavaScript, many template languages).
fn script_escapes(text: &str) -> Cow<'_, str> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(slash) = rest.find('\\') {
        out.push_str(&rest[..slash]);
        let after = &rest[slash + 1..];
        let (digits, skip) = match after.as_bytes().first() {
            Some(b'u') => (4, 1),
            Some(b'x') => (2, 1),
            _ => (0, 0),
        };
        let decoded = after
            .get(skip..skip + digits)
            .filter(|hex| digits > 0 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .and_then(char::from_u32);
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &after[skip + digits..];
                changed = true;
            }
            None => {
                out.push('\\');
                rest = after;
            }
        }
    }
    if !changed {
        return Cow::Borrowed(text);
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undoes_each_encoding_and_their_layers() {
        assert_eq!(normalise("plain text"), "plain text");
        assert!(matches!(normalise("plain"), Cow::Borrowed(_)));
        assert_eq!(normalise("%27%20OR%201=1"), "' OR 1=1");
        assert_eq!(normalise("%252e%252e%252f"), "../", "double encoding");
        assert_eq!(normalise("%25252e"), ".", "triple encoding");
        assert_eq!(normalise("&lt;script&gt;"), "<script>");
        assert_eq!(normalise("&#60;img&#x3E;"), "<img>");
        assert_eq!(normalise("&#0000060"), "<", "no semicolon, zero padded");
        assert_eq!(normalise("\\u003cscript\\x3e"), "<script>");
        assert_eq!(
            normalise("%26lt%3Bsvg%26gt%3B"),
            "<svg>",
            "entities inside percent"
        );
        assert_eq!(normalise("Tom &amp; Jerry"), "Tom & Jerry");
        assert_eq!(
            normalise("R&D; 50% off"),
            "R&D; 50% off",
            "no valid escapes"
        );
        assert_eq!(
            normalise("C:\\new\\x"),
            "C:\\new\\x",
            "backslashes without escapes"
        );
    }
}
