//! The blocklist and allowlist as operators see them, and what the kernel must hold
//! for each entry. Pure logic: no maps, no I/O.

use std::{collections::BTreeMap, time::SystemTime};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{cidr, clock, maps::ListKind};

/// One list entry with the operator's context.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Entry {
    pub cidr: IpNet,
    pub reason: String,
    /// `cli`, `policy:<rule id>` or `state`.
    pub origin: String,
    #[serde(with = "clock::serde_rfc3339")]
    pub created_at: SystemTime,
    /// None: permanent.
    #[serde(with = "clock::serde_rfc3339::option")]
    pub expires_at: Option<SystemTime>,
    /// Throttles: packets per second allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_pps: Option<u32>,
}

impl Entry {
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|deadline| deadline <= now)
    }
}

/// The later of two deadlines, where `None` (never) wins.
fn later(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lists {
    block: BTreeMap<IpNet, Entry>,
    allow: BTreeMap<IpNet, Entry>,
    /// Not persisted: throttles are short-lived, and the kernel ends them by itself.
    throttle: BTreeMap<IpNet, Entry>,
}

impl Lists {
    pub fn get(&self, kind: ListKind) -> &BTreeMap<IpNet, Entry> {
        match kind {
            ListKind::Block => &self.block,
            ListKind::Allow => &self.allow,
            ListKind::Throttle => &self.throttle,
        }
    }

    fn get_mut(&mut self, kind: ListKind) -> &mut BTreeMap<IpNet, Entry> {
        match kind {
            ListKind::Block => &mut self.block,
            ListKind::Allow => &mut self.allow,
            ListKind::Throttle => &mut self.throttle,
        }
    }

    /// Inserts or replaces; returns the previous entry.
    pub fn insert(&mut self, kind: ListKind, entry: Entry) -> Option<Entry> {
        self.get_mut(kind).insert(entry.cidr, entry)
    }

    pub fn remove(&mut self, kind: ListKind, net: &IpNet) -> Option<Entry> {
        self.get_mut(kind).remove(net)
    }

    /// Entries of `kind` whose deadline has passed.
    pub fn expired(&self, kind: ListKind, now: SystemTime) -> Vec<IpNet> {
        self.get(kind)
            .values()
            .filter(|entry| entry.is_expired(now))
            .map(|entry| entry.cidr)
            .collect()
    }

    /// The deadline the kernel entry for `net` must carry, or None when `net` is not
    /// listed. The kernel only sees the longest matching prefix, so a blocklist prefix
    /// carries the latest deadline of every blocklist prefix covering it (itself
    /// included). Hosts live in their own hash, which falls through to the prefixes.
    pub fn kernel_deadline(&self, kind: ListKind, net: &IpNet) -> Option<Option<SystemTime>> {
        let own = self.get(kind).get(net)?;
        if kind != ListKind::Block || cidr::is_host(net) {
            return Some(own.expires_at);
        }
        let deadline = (0..net.prefix_len())
            .filter_map(|bits| cidr::supernet(net, bits))
            .filter_map(|covering| self.block.get(&covering))
            .fold(own.expires_at, |acc, entry| later(acc, entry.expires_at));
        Some(deadline)
    }

    /// Nets whose kernel entries change when `net` is added to or removed from `kind`:
    /// `net` itself and, for a blocklist prefix, every blocklist prefix inside it.
    pub fn affected_by(&self, kind: ListKind, net: &IpNet) -> Vec<IpNet> {
        if kind != ListKind::Block || cidr::is_host(net) {
            return vec![*net];
        }
        let mut nets: Vec<IpNet> = self
            .block
            .range(*net..=cidr::last_host(net))
            .map(|(inner, _)| *inner)
            .filter(|inner| !cidr::is_host(inner) && net.contains(inner) && inner != net)
            .collect();
        nets.push(*net);
        nets
    }

    pub fn from_entries(block: Vec<Entry>, allow: Vec<Entry>) -> Self {
        let mut lists = Lists::default();
        for entry in block {
            lists.insert(ListKind::Block, entry);
        }
        for entry in allow {
            lists.insert(ListKind::Allow, entry);
        }
        lists
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn entry(cidr: &str, expires: Option<u64>) -> Entry {
        Entry {
            cidr: cidr::parse(cidr).unwrap(),
            reason: String::new(),
            origin: "cli".into(),
            created_at: at(0),
            expires_at: expires.map(at),
            rate_pps: None,
        }
    }

    fn net(cidr: &str) -> IpNet {
        cidr::parse(cidr).unwrap()
    }

    #[test]
    fn a_prefix_inherits_the_latest_covering_deadline() {
        let mut lists = Lists::default();
        lists.insert(ListKind::Block, entry("10.0.0.0/8", Some(100)));
        lists.insert(ListKind::Block, entry("10.1.0.0/16", Some(50)));
        lists.insert(ListKind::Block, entry("10.1.2.0/24", Some(200)));
        assert_eq!(
            lists.kernel_deadline(ListKind::Block, &net("10.0.0.0/8")),
            Some(Some(at(100)))
        );
        assert_eq!(
            lists.kernel_deadline(ListKind::Block, &net("10.1.0.0/16")),
            Some(Some(at(100)))
        );
        assert_eq!(
            lists.kernel_deadline(ListKind::Block, &net("10.1.2.0/24")),
            Some(Some(at(200)))
        );
        // A permanent cover makes everything inside it permanent.
        lists.insert(ListKind::Block, entry("10.0.0.0/7", None));
        assert_eq!(
            lists.kernel_deadline(ListKind::Block, &net("10.1.0.0/16")),
            Some(None)
        );
        assert_eq!(
            lists.kernel_deadline(ListKind::Block, &net("11.0.0.0/8")),
            None
        );
    }

    #[test]
    fn hosts_and_allow_entries_keep_their_own_deadline() {
        let mut lists = Lists::default();
        lists.insert(ListKind::Block, entry("10.0.0.0/8", None));
        lists.insert(ListKind::Block, entry("10.0.0.1", Some(5)));
        assert_eq!(
            lists.kernel_deadline(ListKind::Block, &net("10.0.0.1")),
            Some(Some(at(5)))
        );
        lists.insert(ListKind::Allow, entry("10.9.0.0/16", None));
        assert_eq!(
            lists.kernel_deadline(ListKind::Allow, &net("10.9.0.0/16")),
            Some(None)
        );
    }

    #[test]
    fn affected_nets_are_the_prefixes_inside() {
        let mut lists = Lists::default();
        for cidr in [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.3",
            "11.0.0.0/8",
            "2001:db8::/32",
            "2001:db8:1::/48",
        ] {
            lists.insert(ListKind::Block, entry(cidr, None));
        }
        let mut affected = lists.affected_by(ListKind::Block, &net("10.0.0.0/8"));
        affected.sort();
        assert_eq!(affected, vec![net("10.0.0.0/8"), net("10.1.0.0/16")]);
        let affected = lists.affected_by(ListKind::Block, &net("2001:db8::/32"));
        assert_eq!(affected.len(), 2);
        assert_eq!(
            lists.affected_by(ListKind::Block, &net("10.1.2.3")),
            vec![net("10.1.2.3")]
        );
    }

    #[test]
    fn expired_entries_are_found() {
        let mut lists = Lists::default();
        lists.insert(ListKind::Block, entry("10.0.0.1", Some(10)));
        lists.insert(ListKind::Block, entry("10.0.0.2", Some(20)));
        lists.insert(ListKind::Block, entry("10.0.0.3", None));
        lists.insert(ListKind::Throttle, entry("10.0.0.4", Some(5)));
        assert_eq!(
            lists.expired(ListKind::Block, at(15)),
            vec![net("10.0.0.1")]
        );
        assert_eq!(lists.expired(ListKind::Block, at(20)).len(), 2);
        assert_eq!(
            lists.expired(ListKind::Throttle, at(15)),
            vec![net("10.0.0.4")]
        );
    }

    #[test]
    fn entries_round_trip_through_json() {
        let original = entry("2001:db8::/64", Some(1_700_000_000));
        let text = serde_json::to_string(&original).unwrap();
        assert!(
            text.contains("\"expires_at\":\"2023-11-14T22:13:20.000Z\""),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Entry>(&text).unwrap(), original);
    }
}
