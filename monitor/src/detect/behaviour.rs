//! Behaviour over time, per client: object-id enumeration (BOLA), failed logins per
//! client and per IPv6 /64, bursts of 404s. Counted in fixed windows, in bounded
//! memory (the least recently seen clients are forgotten first).

use std::{collections::HashSet, hash::Hash, net::IpAddr, num::NonZeroUsize};

use ipnet::{IpNet, Ipv6Net};
use lru::LruCache;

use super::{
    catalog::{self, RuleInfo},
    config::BehaviourDoc,
};

/// Keys remembered per kind of count.
const MAX_TRACKED: usize = 100_000;

/// A count within the current window.
struct Window<T> {
    started_ns: u64,
    state: T,
    /// Already reported in this window.
    reported: bool,
}

struct Counter<K: Hash + Eq, T> {
    windows: LruCache<K, Window<T>>,
}

impl<K: Hash + Eq, T: Default> Counter<K, T> {
    fn new() -> Self {
        Self {
            windows: LruCache::new(NonZeroUsize::new(MAX_TRACKED).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// The key's window state (a fresh one once `window_ns` has passed), and whether
    /// it was reported already.
    fn at(&mut self, key: K, now_ns: u64, window_ns: u64) -> &mut Window<T> {
        let window = self.windows.get_or_insert_mut(key, || Window {
            started_ns: now_ns,
            state: T::default(),
            reported: false,
        });
        if now_ns.saturating_sub(window.started_ns) >= window_ns {
            *window = Window {
                started_ns: now_ns,
                state: T::default(),
                reported: false,
            };
        }
        window
    }
}

/// Counts `key` once more; true the first time the count reaches `threshold` in
/// the window.
fn bump<K: Hash + Eq>(
    counter: &mut Counter<K, u32>,
    key: K,
    now_ns: u64,
    window_ns: u64,
    threshold: u32,
) -> bool {
    let window = counter.at(key, now_ns, window_ns);
    window.state = window.state.saturating_add(1);
    if window.state >= threshold && !window.reported {
        window.reported = true;
        return true;
    }
    false
}

/// What one exchange tells the tracker.
pub struct Observation<'a> {
    pub client: IpAddr,
    pub route: &'a str,
    /// The path segments the route template replaced by `{id}`.
    pub object_id: Option<&'a str>,
    pub status: Option<u16>,
    pub login: bool,
}

pub struct Tracker {
    /// By client and a hash of the route (templates can be long: keys stay small).
    ids: Counter<(IpAddr, u64), HashSet<u64>>,
    failed_logins: Counter<IpNet, u32>,
    not_found: Counter<IpAddr, u32>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            ids: Counter::new(),
            failed_logins: Counter::new(),
            not_found: Counter::new(),
        }
    }
}

impl Tracker {
    pub fn observe(
        &mut self,
        seen: &Observation<'_>,
        doc: &BehaviourDoc,
        now_ns: u64,
        out: &mut Vec<(&'static RuleInfo, String)>,
    ) {
        let window_ns = u64::try_from(doc.window.0.as_nanos()).unwrap_or(u64::MAX);
        if let Some(id) = seen.object_id {
            let route = fingerprint(seen.route);
            let window = self.ids.at((seen.client, route), now_ns, window_ns);
            // Bounded per key: past the threshold, only whether it was reached matters.
            if window.state.len() < doc.enumeration_ids as usize {
                window.state.insert(fingerprint(id));
            }
            if window.state.len() >= doc.enumeration_ids as usize && !window.reported {
                window.reported = true;
                out.push((
                    catalog::ENUMERATION,
                    format!(
                        "{} ids of {} within {}",
                        window.state.len(),
                        seen.route,
                        humantime::format_duration(doc.window.0)
                    ),
                ));
            }
        }
        if seen.login && matches!(seen.status, Some(401 | 403)) {
            let mut keys = vec![IpNet::from(seen.client)];
            if let IpAddr::V6(v6) = seen.client
                && let Ok(net) = Ipv6Net::new(v6, 64)
            {
                keys.push(IpNet::V6(net.trunc()));
            }
            for key in keys {
                if bump(
                    &mut self.failed_logins,
                    key,
                    now_ns,
                    window_ns,
                    doc.failed_logins,
                ) {
                    out.push((
                        catalog::BRUTE_FORCE,
                        format!("{} failed logins from {key}", doc.failed_logins),
                    ));
                }
            }
        }
        if seen.status == Some(404)
            && bump(
                &mut self.not_found,
                seen.client,
                now_ns,
                window_ns,
                doc.not_found,
            )
        {
            out.push((
                catalog::NOT_FOUND_BURST,
                format!("{} responses 404", doc.not_found),
            ));
        }
    }
}

fn fingerprint(id: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(id)
}

/// Known scanners by their user agent (case-insensitive substrings).
const SCANNERS: &[&str] = &[
    "sqlmap",
    "nikto",
    "nmap",
    "masscan",
    "zgrab",
    "nuclei",
    "gobuster",
    "dirbuster",
    "dirb/",
    "wfuzz",
    "ffuf",
    "feroxbuster",
    "acunetix",
    "nessus",
    "openvas",
    "w3af",
    "arachni",
    "skipfish",
    "wpscan",
    "joomscan",
    "burpcollaborator",
    "zap/",
    "owasp zap",
    "netsparker",
    "qualys",
    "whatweb",
    "jaeles",
    "commix",
    "xsstrike",
    "hydra",
    "medusa",
];

/// All names in one automaton: one pass over each user agent.
static SCANNER_MATCHER: std::sync::LazyLock<Option<aho_corasick::AhoCorasick>> =
    std::sync::LazyLock::new(|| {
        aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(SCANNERS)
            .ok()
    });

pub fn scanner(user_agent: &str) -> Option<&'static str> {
    let matcher = SCANNER_MATCHER.as_ref()?;
    let found = matcher.find(user_agent)?;
    SCANNERS.get(found.pattern().as_usize()).copied()
}
