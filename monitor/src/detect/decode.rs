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
    for (marker, unescape) in [('&', html_entity as Unescape), ('\\', script_escape)] {
        if let Cow::Owned(decoded) = replace_escapes(&current, marker, unescape) {
            current = Cow::Owned(decoded);
        }
    }
    current
}

fn has_percent_escape(text: &str) -> bool {
    text.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

/// Reads one escape from the text after its marker: the character it stands for and
/// how many bytes (after the marker) it took.
type Unescape = fn(&str) -> Option<(char, usize)>;

/// `text` with every escape after `marker` that `unescape` reads replaced.
fn replace_escapes(text: &str, marker: char, unescape: Unescape) -> Cow<'_, str> {
    let mut out = String::new();
    let mut rest = text;
    let mut changed = false;
    while let Some(at) = rest.find(marker) {
        out.push_str(&rest[..at]);
        let after = &rest[at + marker.len_utf8()..];
        match unescape(after) {
            Some((c, used)) => {
                out.push(c);
                rest = &after[used..];
                changed = true;
            }
            None => {
                out.push(marker);
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

/// A character reference after `&`: the named ones attackers use, and numeric ones
/// (`&#60;`, `&#x3c;`), with or without the semicolon, as browsers accept them.
fn html_entity(after: &str) -> Option<(char, usize)> {
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
    let with_semicolon = |c: char, len: usize| {
        let semi = usize::from(after[len..].starts_with(';'));
        (c, len + semi)
    };
    if let Some(numeric) = after.strip_prefix('#') {
        let (digits, radix, prefix) = match numeric.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16, 2),
            None => (numeric, 10, 1),
        };
        let len = digits
            .bytes()
            .take_while(|b| (*b as char).is_digit(radix))
            .count()
            .min(8);
        let c = (len > 0)
            .then(|| u32::from_str_radix(&digits[..len], radix).ok())
            .flatten()
            .and_then(char::from_u32)?;
        return Some(with_semicolon(c, prefix + len));
    }
    NAMED.iter().find_map(|(name, c)| {
        let tail = after.get(..name.len())?;
        tail.eq_ignore_ascii_case(name)
            .then(|| with_semicolon(*c, name.len()))
    })
}

/// A `\u003c` or `\x3c` escape after `\` (JavaScript, many template languages).
fn script_escape(after: &str) -> Option<(char, usize)> {
    let digits = match after.as_bytes().first() {
        Some(b'u') => 4,
        Some(b'x') => 2,
        _ => return None,
    };
    let hex = after
        .get(1..1 + digits)
        .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))?;
    let c = u32::from_str_radix(hex, 16).ok().and_then(char::from_u32)?;
    Some((c, 1 + digits))
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
