//! Keeps the kernel's blocklist and allowlist equal to the operator's lists: every
//! change is written to the maps, persisted, then acknowledged.

pub mod escalation;
pub mod lists;
pub mod state;

use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use monitor_common::datapath::{ListEntry, ReasonCode};
use thiserror::Error;
use tracing::{info, warn};

pub use self::lists::Entry;
use self::{lists::Lists, state::StateFile};
use crate::{
    clock::Clocks,
    maps::{Datapath, ListKind, MapsError},
};

/// Origin of entries found in pinned maps but missing from the state file.
pub const ORIGIN_STATE: &str = "state";
pub const ORIGIN_CLI: &str = "cli";

#[derive(Debug, Error)]
pub enum EnforceError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("not on the {list}: {nets}")]
    NotListed { list: &'static str, nets: String },
}

/// An entry with the kernel's hit counter, as `block ls` shows it.
#[derive(Clone, Debug)]
pub struct EntryWithHits {
    pub entry: Entry,
    pub hits: u64,
}

/// What a policy verdict does in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyEnforcement {
    Block,
    /// At most this many packets per second.
    Throttle(std::num::NonZeroU32),
}

impl PolicyEnforcement {
    pub const fn list(self) -> ListKind {
        match self {
            PolicyEnforcement::Block => ListKind::Block,
            PolicyEnforcement::Throttle(_) => ListKind::Throttle,
        }
    }
}

pub struct Enforcer {
    datapath: Datapath,
    lists: Lists,
    state: StateFile,
    /// Policy changes in the kernel not yet in the state file (see `flush`).
    unsaved: bool,
}

impl Enforcer {
    /// Loads the saved lists and makes the kernel maps match them before anything is
    /// attached. Entries found only in the pinned maps are kept (origin `state`):
    /// never unblock silently.
    pub fn open(datapath: Datapath, state: StateFile) -> Result<Self, EnforceError> {
        let lists = state.load()?;
        let mut enforcer = Self {
            datapath,
            lists,
            state,
            unsaved: false,
        };
        let clocks = Clocks::now();
        let mut adopted = 0usize;
        // Throttles are not in the state file: pinned ones are adopted here, so they are
        // still swept when they expire.
        for kind in [ListKind::Block, ListKind::Allow, ListKind::Throttle] {
            for (net, kernel) in enforcer.datapath.entries(kind)? {
                if enforcer.lists.get(kind).contains_key(&net) {
                    continue;
                }
                let expires_at = (kernel.expires_at_ns != ListEntry::NEVER)
                    .then(|| clocks.to_wall(kernel.expires_at_ns));
                enforcer.lists.insert(
                    kind,
                    Entry {
                        cidr: net,
                        reason: "recovered from pinned map".into(),
                        origin: ORIGIN_STATE.into(),
                        created_at: clocks.wall,
                        expires_at,
                        rate_pps: (kind == ListKind::Throttle).then_some(kernel.rate_pps),
                    },
                );
                adopted += 1;
            }
        }
        if adopted > 0 {
            warn!(
                entries = adopted,
                "Adopted pinned entries missing from the state file"
            );
            enforcer.state.save(&enforcer.lists)?;
        }
        for kind in [ListKind::Block, ListKind::Allow, ListKind::Throttle] {
            let nets: Vec<IpNet> = enforcer.lists.get(kind).keys().copied().collect();
            enforcer.sync(kind, &nets, &clocks)?;
        }
        info!(
            blocklist = enforcer.lists.get(ListKind::Block).len(),
            allowlist = enforcer.lists.get(ListKind::Allow).len(),
            "Lists restored into the datapath"
        );
        Ok(enforcer)
    }

    pub fn len(&self, kind: ListKind) -> usize {
        self.lists.get(kind).len()
    }

    /// Whether `net` itself is on the list and not expired.
    pub fn holds(&self, kind: ListKind, net: &IpNet, now: SystemTime) -> bool {
        self.lists
            .get(kind)
            .get(net)
            .is_some_and(|entry| !entry.is_expired(now))
    }

    /// Entries of `kind` counted by address family (`ipv4`, `ipv6`) and origin.
    pub fn census(
        &self,
        kind: ListKind,
    ) -> std::collections::BTreeMap<(&'static str, String), u64> {
        // Counted under borrowed origins: a scrape of a million entries copies only the
        // few distinct ones.
        let mut counts = std::collections::BTreeMap::<(&'static str, &str), u64>::new();
        for entry in self.lists.get(kind).values() {
            let family = if entry.cidr.addr().is_ipv4() {
                "ipv4"
            } else {
                "ipv6"
            };
            *counts.entry((family, entry.origin.as_str())).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|((family, origin), count)| ((family, origin.to_owned()), count))
            .collect()
    }

    /// Adds (or renews) entries. Acknowledged only once in the kernel and on disk; on
    /// failure nothing changes.
    pub fn add(
        &mut self,
        kind: ListKind,
        nets: &[IpNet],
        ttl: Option<Duration>,
        reason: &str,
        origin: &str,
    ) -> Result<Vec<Entry>, EnforceError> {
        self.add_entries(kind, nets, ttl, reason, origin, None, true)
    }

    /// Carries out a policy verdict: in the kernel at once; a block reaches the state
    /// file at the next `flush` (a flood of offenders must not rewrite it once each),
    /// a throttle never (it ends with its TTL).
    pub fn enforce_for_policy(
        &mut self,
        enforcement: PolicyEnforcement,
        nets: &[IpNet],
        ttl: Duration,
        reason: &str,
        origin: &str,
    ) -> Result<Vec<Entry>, EnforceError> {
        let rate_pps = match enforcement {
            PolicyEnforcement::Block => None,
            PolicyEnforcement::Throttle(pps) => Some(pps.get()),
        };
        self.add_entries(
            enforcement.list(),
            nets,
            Some(ttl),
            reason,
            origin,
            rate_pps,
            false,
        )
    }

    /// Writes the state file if policy blocks changed the lists since it was written.
    pub fn flush(&mut self) -> Result<(), EnforceError> {
        if self.unsaved {
            self.state.save(&self.lists)?;
            self.unsaved = false;
        }
        Ok(())
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one private constructor behind the public ones"
    )]
    fn add_entries(
        &mut self,
        kind: ListKind,
        nets: &[IpNet],
        ttl: Option<Duration>,
        reason: &str,
        origin: &str,
        rate_pps: Option<u32>,
        persist_now: bool,
    ) -> Result<Vec<Entry>, EnforceError> {
        let clocks = Clocks::now();
        // What each changed net held, to undo on failure (not a copy of the lists: they
        // may hold a million entries and a policy adds one).
        let mut undo = Vec::with_capacity(nets.len());
        let mut added = Vec::with_capacity(nets.len());
        let mut affected = Vec::new();
        for net in nets {
            let created_at = self
                .lists
                .get(kind)
                .get(net)
                .map_or(clocks.wall, |e| e.created_at);
            let entry = Entry {
                cidr: *net,
                reason: reason.to_owned(),
                origin: origin.to_owned(),
                created_at,
                expires_at: ttl.map(|ttl| clocks.wall + ttl),
                rate_pps,
            };
            undo.push((*net, self.lists.insert(kind, entry.clone())));
            affected.extend(self.lists.affected_by(kind, net));
            added.push(entry);
        }
        self.commit(kind, &affected, undo, &clocks, persist_now)?;
        Ok(added)
    }

    /// Removes entries; fails without changing anything when one is not listed.
    pub fn remove(&mut self, kind: ListKind, nets: &[IpNet]) -> Result<Vec<Entry>, EnforceError> {
        let missing: Vec<String> = nets
            .iter()
            .filter(|net| !self.lists.get(kind).contains_key(net))
            .map(ToString::to_string)
            .collect();
        if !missing.is_empty() {
            return Err(EnforceError::NotListed {
                list: kind.name(),
                nets: missing.join(", "),
            });
        }
        self.remove_present(kind, nets)
    }

    /// Removes every blocklist entry whose deadline has passed (the kernel already
    /// ignores them; this keeps the maps and `block ls` tidy).
    pub fn sweep(&mut self, now: SystemTime) -> Result<Vec<(ListKind, Entry)>, EnforceError> {
        let mut swept = Vec::new();
        for kind in [ListKind::Block, ListKind::Throttle] {
            let expired = self.lists.expired(kind, now);
            if !expired.is_empty() {
                let removed = self.remove_present(kind, &expired)?;
                swept.extend(removed.into_iter().map(|entry| (kind, entry)));
            }
        }
        Ok(swept)
    }

    /// See `Datapath::settle`.
    pub fn settle(&mut self) -> Result<(), EnforceError> {
        Ok(self.datapath.settle()?)
    }

    fn remove_present(
        &mut self,
        kind: ListKind,
        nets: &[IpNet],
    ) -> Result<Vec<Entry>, EnforceError> {
        let clocks = Clocks::now();
        let mut undo = Vec::with_capacity(nets.len());
        let mut removed = Vec::with_capacity(nets.len());
        let mut affected = Vec::new();
        for net in nets {
            affected.extend(self.lists.affected_by(kind, net));
            if let Some(entry) = self.lists.remove(kind, net) {
                undo.push((*net, Some(entry.clone())));
                removed.push(entry);
            }
        }
        self.commit(kind, &affected, undo, &clocks, true)?;
        Ok(removed)
    }

    /// Writes the affected kernel entries and the state file; on failure, restores
    /// the previous lists in memory and (best effort) in the kernel.
    fn commit(
        &mut self,
        kind: ListKind,
        affected: &[IpNet],
        undo: Vec<(IpNet, Option<Entry>)>,
        clocks: &Clocks,
        persist_now: bool,
    ) -> Result<(), EnforceError> {
        // Throttles are not persisted at all; policy blocks at the next flush.
        let result = self.sync(kind, affected, clocks).and_then(|()| {
            if kind == ListKind::Throttle {
                Ok(())
            } else if persist_now {
                self.state.save(&self.lists)?;
                self.unsaved = false;
                Ok(())
            } else {
                self.unsaved = true;
                Ok(())
            }
        });
        if let Err(error) = result {
            for (net, previous) in undo.into_iter().rev() {
                match previous {
                    Some(entry) => {
                        self.lists.insert(kind, entry);
                    }
                    None => {
                        self.lists.remove(kind, &net);
                    }
                }
            }
            if let Err(rollback) = self.sync(kind, affected, clocks) {
                warn!(error = %rollback, "Rolling back the datapath failed; maps may differ until restart");
            }
            return Err(error);
        }
        Ok(())
    }

    /// Makes the kernel entries of `nets` match the lists, keeping their hit counters.
    fn sync(
        &mut self,
        kind: ListKind,
        nets: &[IpNet],
        clocks: &Clocks,
    ) -> Result<(), EnforceError> {
        for net in nets {
            match self.lists.kernel_deadline(kind, net) {
                Some(deadline) => {
                    let hits = self.datapath.get(kind, net)?.map_or(0, |e| e.hits);
                    let listed = self.lists.get(kind).get(net);
                    let origin = listed.map_or("", |e| e.origin.as_str());
                    let entry = ListEntry {
                        expires_at_ns: deadline
                            .map_or(ListEntry::NEVER, |d| clocks.to_monotonic(d)),
                        hits,
                        reason: reason_code(origin) as u32,
                        rate_pps: listed.and_then(|e| e.rate_pps).unwrap_or(0),
                    };
                    self.datapath.put(kind, net, entry)?;
                }
                None => self.datapath.remove(kind, net)?,
            }
        }
        Ok(())
    }

    /// Entries with their kernel hit counters.
    pub fn entries(&self, kind: ListKind) -> Result<Vec<EntryWithHits>, EnforceError> {
        self.lists
            .get(kind)
            .values()
            .map(|entry| {
                let hits = self.datapath.get(kind, &entry.cidr)?.map_or(0, |e| e.hits);
                Ok(EntryWithHits {
                    entry: entry.clone(),
                    hits,
                })
            })
            .collect()
    }
}

fn reason_code(origin: &str) -> ReasonCode {
    if origin.starts_with("policy:") {
        ReasonCode::Policy
    } else if origin == ORIGIN_STATE {
        ReasonCode::State
    } else {
        ReasonCode::Cli
    }
}
