//! Server-side request forgery: parameter values that are URLs (or, in parameters
//! named like URLs, bare hosts) pointing inside: loopback, private, link-local and
//! cloud-metadata addresses in any spelling a URL parser accepts (decimal, octal,
//! hex, shortened, IPv4-mapped IPv6), internal names, and non-HTTP schemes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    catalog::{self, RuleInfo},
    inputs::Input,
};

/// Schemes that reach other protocols or the local filesystem.
const DANGEROUS_SCHEMES: &[&str] = &[
    "file", "gopher", "dict", "ldap", "ldaps", "tftp", "jar", "netdoc", "sftp", "smb", "phar",
    "expect", "php", "ftp",
];

/// Parameter names that carry a URL or host by convention: a word of the name's last
/// part (`webhook_url`, `callbackUrl`, `target.host`) is one of these, and the name is
/// not an id (`site_id`).
fn url_named(name: &str) -> bool {
    const HINTS: &[&str] = &[
        "url",
        "uri",
        "link",
        "href",
        "host",
        "hostname",
        "domain",
        "callback",
        "webhook",
        "redirect",
        "dest",
        "destination",
        "target",
        "endpoint",
        "proxy",
        "feed",
        "fetch",
        "src",
        "server",
        "upstream",
        "origin",
    ];
    let last = crate::http::query::leaf_name(name);
    // Words split at `_`, `-` and camelCase humps.
    let mut words = Vec::new();
    let mut word = String::new();
    for c in last.chars() {
        if (c == '_' || c == '-' || c.is_ascii_uppercase()) && !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        if c != '_' && c != '-' {
            word.push(c.to_ascii_lowercase());
        }
    }
    words.push(word);
    words.last().is_none_or(|w| w != "id" && w != "ids")
        && words.iter().any(|w| HINTS.contains(&w.as_str()))
}

/// A bare value that names a host: letters (a name), an IPv4 dotted quad, a port or an
/// IPv6 literal. Plain numbers (`1234`, `0.75`) would parse as IPv4 but are not meant so.
fn host_like(value: &str) -> bool {
    value.bytes().any(|b| b.is_ascii_alphabetic())
        || value.bytes().filter(|b| *b == b'.').count() == 3
        || value.contains([':', '['])
}

/// Names that resolve inside (or to a metadata service) wherever they are used.
fn internal_name(host: &str) -> Option<&'static RuleInfo> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    const METADATA: &[&str] = &[
        "metadata.google.internal",
        "metadata.goog",
        "metadata",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.com",
    ];
    if METADATA.contains(&host.as_str()) {
        return Some(catalog::SSRF_METADATA);
    }
    const LOOPBACK_NAMES: &[&str] = &["localhost", "localtest.me", "lvh.me", "vcap.me"];
    if LOOPBACK_NAMES.contains(&host.as_str())
        || host.ends_with(".localhost")
        || host.ends_with(".localtest.me")
        || host.ends_with(".lvh.me")
        || host.ends_with(".internal")
        || host.ends_with(".svc.cluster.local")
    {
        return Some(catalog::SSRF_INTERNAL);
    }
    // Wildcard DNS services that answer with the address in the name
    // (`127.0.0.1.nip.io`, `10-0-0-1.sslip.io`).
    for service in [".nip.io", ".sslip.io", ".xip.io"] {
        if let Some(prefix) = host.strip_suffix(service) {
            let tail: Vec<&str> = prefix.rsplit(['.', '-']).take(4).collect();
            let spelled: String = tail.iter().rev().copied().collect::<Vec<_>>().join(".");
            if let Ok(ip) = spelled.parse::<Ipv4Addr>() {
                return address_rule(IpAddr::V4(ip));
            }
        }
    }
    None
}

fn v4_rule(ip: Ipv4Addr) -> Option<&'static RuleInfo> {
    let [a, b, c, d] = ip.octets();
    if (a, b, c, d) == (169, 254, 169, 254) || (a, b, c, d) == (100, 100, 100, 200) {
        return Some(catalog::SSRF_METADATA);
    }
    let internal = ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || (a == 100 && (64..128).contains(&b))
        || a == 0;
    internal.then_some(catalog::SSRF_INTERNAL)
}

fn address_rule(ip: IpAddr) -> Option<&'static RuleInfo> {
    match ip {
        IpAddr::V4(v4) => v4_rule(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_rule(v4);
            }
            if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                return Some(catalog::SSRF_METADATA);
            }
            let bits = v6.to_bits();
            // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address.
            if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
                return v4_rule(Ipv4Addr::from_bits(bits as u32));
            }
            if bits >> 112 == 0x2002 {
                return v4_rule(Ipv4Addr::from_bits((bits >> 80) as u32));
            }
            let first = v6.segments()[0];
            let internal = v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                // IPv4-compatible (deprecated, still parsed): ::127.0.0.1
                || (v6.segments()[..6].iter().all(|s| *s == 0)
                    && v4_rule(Ipv4Addr::from_bits(v6.to_bits() as u32)).is_some());
            internal.then_some(catalog::SSRF_INTERNAL)
        }
    }
}

fn host_rule(host: url::Host<&str>) -> Option<&'static RuleInfo> {
    match host {
        url::Host::Ipv4(ip) => v4_rule(ip),
        url::Host::Ipv6(ip) => address_rule(IpAddr::V6(ip)),
        url::Host::Domain(name) => internal_name(name),
    }
}

/// The SSRF rule `input` breaks, if any.
pub fn scan(input: &Input<'_>) -> Option<&'static RuleInfo> {
    if !input.location.is_parameter_value() {
        return None;
    }
    let value = input.value.trim();
    if value.len() < 4 {
        return None;
    }
    let starts_with = |prefix: &str| {
        value
            .as_bytes()
            .get(..prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(prefix.as_bytes()))
    };
    let candidate = if starts_with("http:") || starts_with("https:") {
        // The URL parser reads `http:/h`, `http:h` and `http:\\h` as `http://h`.
        value.to_owned()
    } else if let Some(scheme_end) = value.find("://").filter(|at| *at <= 10) {
        // `jar:http://...` wraps one URL in another scheme.
        let scheme = value[..scheme_end].to_ascii_lowercase();
        let outer = scheme.split(':').next().unwrap_or_default();
        if DANGEROUS_SCHEMES.contains(&scheme.as_str()) || DANGEROUS_SCHEMES.contains(&outer) {
            return Some(catalog::SSRF_SCHEME);
        }
        value.to_owned()
    } else if let Some(rest) = value.strip_prefix("//") {
        format!("http://{rest}")
    } else if let Some((scheme, _)) = value.split_once(':')
        && ["gopher", "dict", "file", "jar", "netdoc"]
            .contains(&scheme.to_ascii_lowercase().as_str())
    {
        return Some(catalog::SSRF_SCHEME);
    } else if host_like(value) && !value.contains(char::is_whitespace) && url_named(&input.name) {
        format!("http://{value}")
    } else {
        return None;
    };
    let parsed = url::Url::parse(&candidate).ok()?;
    if !matches!(parsed.scheme(), "http" | "https" | "ws" | "wss") {
        return None;
    }
    parsed.host().and_then(host_rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::inputs::Location;

    fn rule(name: &str, value: &str) -> Option<&'static str> {
        scan(&Input {
            location: Location::Query,
            name: name.into(),
            value: value.into(),
        })
        .map(|r| r.id)
    }

    #[test]
    fn internal_targets_in_any_spelling() {
        let internal = Some("ssrf-internal-address");
        let metadata = Some("ssrf-cloud-metadata");
        assert_eq!(rule("q", "http://127.0.0.1/admin"), internal);
        assert_eq!(rule("q", "http://2130706433/"), internal, "decimal");
        assert_eq!(rule("q", "http://0177.0.0.1/"), internal, "octal");
        assert_eq!(rule("q", "http://0x7f.1/"), internal, "hex, shortened");
        assert_eq!(rule("q", "http://127.1:8080/"), internal, "shortened");
        assert_eq!(rule("q", "http://[::1]/"), internal);
        assert_eq!(rule("q", "http://[::ffff:127.0.0.1]/"), internal, "mapped");
        assert_eq!(
            rule("q", "http://[::ffff:a9fe:a9fe]/"),
            metadata,
            "mapped, hex"
        );
        assert_eq!(rule("q", "http://10.0.0.5/"), internal);
        assert_eq!(rule("q", "https://user@192.168.1.1/"), internal, "userinfo");
        assert_eq!(rule("q", "http://good.example@localhost/"), internal);
        assert_eq!(
            rule("q", "http://169.254.169.254/latest/meta-data/"),
            metadata
        );
        assert_eq!(rule("q", "http://metadata.google.internal/"), metadata);
        assert_eq!(rule("q", "http://127.0.0.1.nip.io/"), internal);
        assert_eq!(
            rule("webhook_url", "169.254.169.254"),
            metadata,
            "bare host"
        );
        assert_eq!(rule("callback", "localhost:6379"), internal);
        assert_eq!(rule("q", "//127.0.0.1/x"), internal, "scheme-relative");
        assert_eq!(rule("q", "file:///etc/passwd"), Some("ssrf-scheme"));
        assert_eq!(
            rule("q", "gopher://127.0.0.1:6379/_INFO"),
            Some("ssrf-scheme")
        );
        assert_eq!(
            rule("q", "dict://localhost:11211/stat"),
            Some("ssrf-scheme")
        );
    }

    #[test]
    fn spellings_that_parsers_accept() {
        let internal = Some("ssrf-internal-address");
        assert_eq!(rule("q", "http:/127.0.0.1/"), internal, "one slash");
        assert_eq!(rule("q", "HTTP:127.0.0.1"), internal, "no slash");
        assert_eq!(rule("q", "http:\\\\127.0.0.1\\"), internal, "backslashes");
        let long = format!("http://127.0.0.1/{}", "a".repeat(5000));
        assert_eq!(rule("q", &long), internal, "long");
        assert_eq!(
            rule("q", "http://[64:ff9b::a9fe:a9fe]/"),
            Some("ssrf-cloud-metadata"),
            "NAT64"
        );
        assert_eq!(rule("q", "http://[2002:7f00:1::]/"), internal, "6to4");
        assert_eq!(rule("callbackUrl", "10.1.2.3"), internal, "camelCase name");
    }

    #[test]
    fn public_targets_and_plain_text_pass() {
        assert_eq!(rule("q", "https://example.com/a?b=c"), None);
        assert_eq!(rule("url", "https://api.github.com/repos"), None);
        assert_eq!(rule("callback", "https://hooks.example.org/x"), None);
        assert_eq!(rule("url", "8.8.8.8"), None);
        assert_eq!(
            rule("q", "127.0.0.1"),
            None,
            "not a URL, not a URL parameter"
        );
        assert_eq!(rule("note", "see http://example.com for more"), None);
        assert_eq!(rule("time", "10:30"), None);
        for (name, value) in [
            ("site_id", "1234"),
            ("next", "1000"),
            ("image_scale", "0.75"),
            ("address_id", "56789"),
            ("feedback", "localhost is down"),
            ("server_id", "127"),
        ] {
            assert_eq!(rule(name, value), None, "{name}={value}");
        }
    }
}
