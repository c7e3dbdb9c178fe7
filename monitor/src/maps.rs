//! Typed access to the datapath maps: the only place that knows their key layouts.

use std::{collections::HashSet, net::IpAddr};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
};
use ipnet::IpNet;
use monitor_common::{
    datapath::{Action, ActionCounter, DatapathState, IpKey, IpStats, ListEntry, RateConfig},
    maps,
};
use thiserror::Error;

use crate::cidr;

#[derive(Debug, Error)]
pub enum MapsError {
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// Which list an entry belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListKind {
    Block,
    Allow,
    /// Per-source packet rate limits (`ListEntry::rate_pps`).
    Throttle,
}

impl ListKind {
    pub const fn name(self) -> &'static str {
        match self {
            ListKind::Block => "blocklist",
            ListKind::Allow => "allowlist",
            ListKind::Throttle => "throttle list",
        }
    }

    /// Event actions are `<noun>_added`, `<noun>_removed`, `<noun>_expired`.
    pub const fn noun(self) -> &'static str {
        match self {
            ListKind::Block => "block",
            ListKind::Allow => "allow",
            ListKind::Throttle => "throttle",
        }
    }
}

/// The six list maps, by list, family and (for the blocklist) host or prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListMap {
    BlockV4Hosts,
    BlockV6Hosts,
    BlockV4Nets,
    BlockV6Nets,
    AllowV4,
    AllowV6,
    ThrottleV4,
    ThrottleV6,
}

impl ListMap {
    const ALL: [ListMap; 8] = [
        ListMap::BlockV4Hosts,
        ListMap::BlockV6Hosts,
        ListMap::BlockV4Nets,
        ListMap::BlockV6Nets,
        ListMap::AllowV4,
        ListMap::AllowV6,
        ListMap::ThrottleV4,
        ListMap::ThrottleV6,
    ];

    /// Blocklist hosts go to the exact-match hashes, everything else to the tries.
    fn of(list: ListKind, net: &IpNet) -> Self {
        match (list, net, cidr::is_host(net)) {
            (ListKind::Block, IpNet::V4(_), true) => ListMap::BlockV4Hosts,
            (ListKind::Block, IpNet::V6(_), true) => ListMap::BlockV6Hosts,
            (ListKind::Block, IpNet::V4(_), false) => ListMap::BlockV4Nets,
            (ListKind::Block, IpNet::V6(_), false) => ListMap::BlockV6Nets,
            (ListKind::Allow, IpNet::V4(_), _) => ListMap::AllowV4,
            (ListKind::Allow, IpNet::V6(_), _) => ListMap::AllowV6,
            (ListKind::Throttle, IpNet::V4(_), _) => ListMap::ThrottleV4,
            (ListKind::Throttle, IpNet::V6(_), _) => ListMap::ThrottleV6,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            ListMap::BlockV4Hosts => maps::BLOCK_V4_HOSTS,
            ListMap::BlockV6Hosts => maps::BLOCK_V6_HOSTS,
            ListMap::BlockV4Nets => maps::BLOCK_V4_NETS,
            ListMap::BlockV6Nets => maps::BLOCK_V6_NETS,
            ListMap::AllowV4 => maps::ALLOW_V4,
            ListMap::AllowV6 => maps::ALLOW_V6,
            ListMap::ThrottleV4 => maps::THROTTLE_V4,
            ListMap::ThrottleV6 => maps::THROTTLE_V6,
        }
    }

    const fn present_bit(self) -> u32 {
        match self {
            ListMap::BlockV4Hosts => DatapathState::PRESENT_BLOCK_V4_HOSTS,
            ListMap::BlockV6Hosts => DatapathState::PRESENT_BLOCK_V6_HOSTS,
            ListMap::BlockV4Nets => DatapathState::PRESENT_BLOCK_V4_NETS,
            ListMap::BlockV6Nets => DatapathState::PRESENT_BLOCK_V6_NETS,
            ListMap::AllowV4 => DatapathState::PRESENT_ALLOW_V4,
            ListMap::AllowV6 => DatapathState::PRESENT_ALLOW_V6,
            ListMap::ThrottleV4 => DatapathState::PRESENT_THROTTLE_V4,
            ListMap::ThrottleV6 => DatapathState::PRESENT_THROTTLE_V6,
        }
    }
}

/// Handles on every map the daemon reads or writes.
pub struct Datapath {
    block_v4_hosts: HashMap<MapData, [u8; 4], ListEntry>,
    block_v6_hosts: HashMap<MapData, [u8; 16], ListEntry>,
    block_v4_nets: LpmTrie<MapData, [u8; 4], ListEntry>,
    block_v6_nets: LpmTrie<MapData, [u8; 16], ListEntry>,
    allow_v4: LpmTrie<MapData, [u8; 4], ListEntry>,
    allow_v6: LpmTrie<MapData, [u8; 16], ListEntry>,
    throttle_v4: LpmTrie<MapData, [u8; 4], ListEntry>,
    throttle_v6: LpmTrie<MapData, [u8; 16], ListEntry>,
    rate_config: Array<MapData, RateConfig>,
    state: Array<MapData, DatapathState>,
    /// The keys in each list map (indexed like `ListMap::ALL`). A trie lookup is a
    /// longest-prefix match, not an exact one, so "is this prefix stored" is answered
    /// here; it also gives `DatapathState::present`.
    keys: [HashSet<IpNet>; 8],
    /// The last `DatapathState::epoch` written.
    epoch: u32,
    /// A list changed since the last `settle`.
    unsettled: bool,
    /// `DatapathState::CAPTURE_ENABLED`, published with the rest.
    capture_enabled: bool,
    /// `DatapathState::RATE_LIMITS`: default per-source limits are set.
    rate_limits: bool,
}

/// Takes a map out of the loaded object as its typed handle.
pub(crate) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Map { name, source })
}

/// Maps a "no such key" to `None`, other errors through.
fn optional<V>(name: &'static str, result: Result<V, MapError>) -> Result<Option<V>, MapsError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(MapsError::Map { name, source }),
    }
}

fn v4_key(net: &ipnet::Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.addr().octets())
}

fn v6_key(net: &ipnet::Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.addr().octets())
}

impl Datapath {
    /// Takes the maps out of the object and tells the kernel which list maps hold
    /// entries (adopted pinned maps may already).
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let mut datapath = Self {
            block_v4_hosts: take(ebpf, maps::BLOCK_V4_HOSTS)?,
            block_v6_hosts: take(ebpf, maps::BLOCK_V6_HOSTS)?,
            block_v4_nets: take(ebpf, maps::BLOCK_V4_NETS)?,
            block_v6_nets: take(ebpf, maps::BLOCK_V6_NETS)?,
            allow_v4: take(ebpf, maps::ALLOW_V4)?,
            allow_v6: take(ebpf, maps::ALLOW_V6)?,
            throttle_v4: take(ebpf, maps::THROTTLE_V4)?,
            throttle_v6: take(ebpf, maps::THROTTLE_V6)?,
            rate_config: take(ebpf, maps::RATE_CONFIG)?,
            state: take(ebpf, maps::DATAPATH_STATE)?,
            keys: Default::default(),
            epoch: 0,
            unsettled: false,
            capture_enabled: false,
            rate_limits: false,
        };
        // Continue from a pinned epoch, so verdicts cached under it are never reused.
        datapath.epoch = datapath
            .state
            .get(&0, 0)
            .map_err(|source| MapsError::Map {
                name: maps::DATAPATH_STATE,
                source,
            })?
            .epoch;
        for list in [ListKind::Block, ListKind::Allow, ListKind::Throttle] {
            for (net, _) in datapath.entries(list)? {
                datapath.keys[ListMap::of(list, &net) as usize].insert(net);
            }
        }
        datapath.write_state()?;
        Ok(datapath)
    }

    /// Tells the kernel programs whether to look at HTTP capture at all (they skip its
    /// port lookup on every TCP packet when it is off).
    pub fn set_capture_enabled(&mut self, enabled: bool) -> Result<(), MapsError> {
        self.capture_enabled = enabled;
        self.write_state()
    }

    /// Default per-source limits for the kernel's token buckets (all 0: none).
    pub fn set_rate_limits(&mut self, config: RateConfig) -> Result<(), MapsError> {
        self.rate_config
            .set(0, config, 0)
            .map_err(|source| MapsError::Map {
                name: maps::RATE_CONFIG,
                source,
            })?;
        self.rate_limits = config.pps != 0 || config.syn_ps != 0;
        self.write_state()
    }

    /// Turns the kernel's pass-verdict cache off (epoch 0) until the next list change,
    /// so that every packet goes through the list lookups. For benchmarks of the
    /// uncached path; the daemon never calls it.
    pub fn disable_verdict_cache(&mut self) -> Result<(), MapsError> {
        let present = self.state.get(&0, 0).map_or(0, |state| state.present);
        self.state
            .set(0, DatapathState { present, epoch: 0 }, 0)
            .map_err(|source| MapsError::Map {
                name: maps::DATAPATH_STATE,
                source,
            })
    }

    /// Publishes the state once more under a new epoch if a list changed since the
    /// last call. Called periodically: a packet racing a change may have read the new
    /// epoch yet missed the new entry (nothing orders the two reads on every
    /// architecture, and the state is copied without atomicity), caching a pass it
    /// should not have; one more epoch shortly after bounds how long that can last.
    pub fn settle(&mut self) -> Result<(), MapsError> {
        if !self.unsettled {
            return Ok(());
        }
        self.write_state()?;
        self.unsettled = false;
        Ok(())
    }

    /// Publishes which maps hold entries under a new epoch, which also invalidates
    /// every pass verdict the kernel cached. Called after each change to a list map.
    fn write_state(&mut self) -> Result<(), MapsError> {
        self.unsettled = true;
        let capture = if self.capture_enabled {
            DatapathState::CAPTURE_ENABLED
        } else {
            0
        } | if self.rate_limits {
            DatapathState::RATE_LIMITS
        } else {
            0
        };
        let present = ListMap::ALL
            .iter()
            .filter(|map| !self.keys[**map as usize].is_empty())
            .fold(capture, |bits, map| bits | map.present_bit());
        self.epoch = DatapathState::next_epoch(self.epoch);
        let epoch = self.epoch;
        self.state
            .set(0, DatapathState { present, epoch }, 0)
            .map_err(|source| MapsError::Map {
                name: maps::DATAPATH_STATE,
                source,
            })
    }

    /// Reads the kernel entry stored for exactly `net`, if any.
    pub fn get(&self, list: ListKind, net: &IpNet) -> Result<Option<ListEntry>, MapsError> {
        let map = ListMap::of(list, net);
        if !self.keys[map as usize].contains(net) {
            return Ok(None);
        }
        // The exact key is stored, so the longest match of a lookup limited to its
        // prefix length is that key's entry.
        let result = match (map, net) {
            (ListMap::BlockV4Hosts, IpNet::V4(v4)) => {
                self.block_v4_hosts.get(&v4.addr().octets(), 0)
            }
            (ListMap::BlockV6Hosts, IpNet::V6(v6)) => {
                self.block_v6_hosts.get(&v6.addr().octets(), 0)
            }
            (ListMap::BlockV4Nets, IpNet::V4(v4)) => self.block_v4_nets.get(&v4_key(v4), 0),
            (ListMap::BlockV6Nets, IpNet::V6(v6)) => self.block_v6_nets.get(&v6_key(v6), 0),
            (ListMap::AllowV4, IpNet::V4(v4)) => self.allow_v4.get(&v4_key(v4), 0),
            (ListMap::AllowV6, IpNet::V6(v6)) => self.allow_v6.get(&v6_key(v6), 0),
            (ListMap::ThrottleV4, IpNet::V4(v4)) => self.throttle_v4.get(&v4_key(v4), 0),
            (ListMap::ThrottleV6, IpNet::V6(v6)) => self.throttle_v6.get(&v6_key(v6), 0),
            _ => Err(MapError::KeyNotFound),
        };
        optional(map.name(), result)
    }

    /// Writes the kernel entry for `net` (hosts of the blocklist go to the exact-match
    /// hash, everything else to the tries).
    pub fn put(&mut self, list: ListKind, net: &IpNet, entry: ListEntry) -> Result<(), MapsError> {
        self.insert(list, net, entry)?;
        self.keys[ListMap::of(list, net) as usize].insert(*net);
        // Entry first, then the state: the kernel never skips a map holding it, nor
        // reuses a verdict cached before it.
        self.write_state()
    }

    fn insert(&mut self, list: ListKind, net: &IpNet, entry: ListEntry) -> Result<(), MapsError> {
        let map = ListMap::of(list, net);
        let result = match (map, net) {
            (ListMap::BlockV4Hosts, IpNet::V4(v4)) => {
                self.block_v4_hosts.insert(v4.addr().octets(), entry, 0)
            }
            (ListMap::BlockV6Hosts, IpNet::V6(v6)) => {
                self.block_v6_hosts.insert(v6.addr().octets(), entry, 0)
            }
            (ListMap::BlockV4Nets, IpNet::V4(v4)) => {
                self.block_v4_nets.insert(&v4_key(v4), entry, 0)
            }
            (ListMap::BlockV6Nets, IpNet::V6(v6)) => {
                self.block_v6_nets.insert(&v6_key(v6), entry, 0)
            }
            (ListMap::AllowV4, IpNet::V4(v4)) => self.allow_v4.insert(&v4_key(v4), entry, 0),
            (ListMap::AllowV6, IpNet::V6(v6)) => self.allow_v6.insert(&v6_key(v6), entry, 0),
            (ListMap::ThrottleV4, IpNet::V4(v4)) => self.throttle_v4.insert(&v4_key(v4), entry, 0),
            (ListMap::ThrottleV6, IpNet::V6(v6)) => self.throttle_v6.insert(&v6_key(v6), entry, 0),
            _ => Ok(()),
        };
        result.map_err(|source| MapsError::Map {
            name: map.name(),
            source,
        })
    }

    /// Removes the kernel entry for `net`; absent is fine.
    pub fn remove(&mut self, list: ListKind, net: &IpNet) -> Result<(), MapsError> {
        let map = ListMap::of(list, net);
        if !self.keys[map as usize].contains(net) {
            return Ok(());
        }
        self.delete(list, net)?;
        self.keys[map as usize].remove(net);
        self.write_state()
    }

    fn delete(&mut self, list: ListKind, net: &IpNet) -> Result<(), MapsError> {
        let map = ListMap::of(list, net);
        let result = match (map, net) {
            (ListMap::BlockV4Hosts, IpNet::V4(v4)) => {
                self.block_v4_hosts.remove(&v4.addr().octets())
            }
            (ListMap::BlockV6Hosts, IpNet::V6(v6)) => {
                self.block_v6_hosts.remove(&v6.addr().octets())
            }
            (ListMap::BlockV4Nets, IpNet::V4(v4)) => self.block_v4_nets.remove(&v4_key(v4)),
            (ListMap::BlockV6Nets, IpNet::V6(v6)) => self.block_v6_nets.remove(&v6_key(v6)),
            (ListMap::AllowV4, IpNet::V4(v4)) => self.allow_v4.remove(&v4_key(v4)),
            (ListMap::AllowV6, IpNet::V6(v6)) => self.allow_v6.remove(&v6_key(v6)),
            (ListMap::ThrottleV4, IpNet::V4(v4)) => self.throttle_v4.remove(&v4_key(v4)),
            (ListMap::ThrottleV6, IpNet::V6(v6)) => self.throttle_v6.remove(&v6_key(v6)),
            _ => Ok(()),
        };
        optional(map.name(), result).map(|_| ())
    }

    /// Every entry the kernel holds for a list (adopting pinned state on restart).
    pub fn entries(&self, list: ListKind) -> Result<Vec<(IpNet, ListEntry)>, MapsError> {
        fn collect<I, K>(
            name: &'static str,
            iter: I,
            out: &mut Vec<(IpNet, ListEntry)>,
            to_net: impl Fn(K) -> Option<IpNet>,
        ) -> Result<(), MapsError>
        where
            I: Iterator<Item = Result<(K, ListEntry), MapError>>,
        {
            for item in iter {
                let (key, entry) = item.map_err(|source| MapsError::Map { name, source })?;
                if let Some(net) = to_net(key) {
                    out.push((net, entry));
                }
            }
            Ok(())
        }
        let v4_net = |key: Key<[u8; 4]>| {
            ipnet::Ipv4Net::new(key.data().into(), u8::try_from(key.prefix_len()).ok()?)
                .ok()
                .map(IpNet::V4)
        };
        let v6_net = |key: Key<[u8; 16]>| {
            ipnet::Ipv6Net::new(key.data().into(), u8::try_from(key.prefix_len()).ok()?)
                .ok()
                .map(IpNet::V6)
        };
        let mut out = Vec::new();
        match list {
            ListKind::Block => {
                collect(
                    maps::BLOCK_V4_HOSTS,
                    self.block_v4_hosts.iter(),
                    &mut out,
                    |k: [u8; 4]| Some(IpNet::from(IpAddr::from(k))),
                )?;
                collect(
                    maps::BLOCK_V6_HOSTS,
                    self.block_v6_hosts.iter(),
                    &mut out,
                    |k: [u8; 16]| Some(IpNet::from(IpAddr::from(k))),
                )?;
                collect(
                    maps::BLOCK_V4_NETS,
                    self.block_v4_nets.iter(),
                    &mut out,
                    v4_net,
                )?;
                collect(
                    maps::BLOCK_V6_NETS,
                    self.block_v6_nets.iter(),
                    &mut out,
                    v6_net,
                )?;
            }
            ListKind::Allow => {
                collect(maps::ALLOW_V4, self.allow_v4.iter(), &mut out, v4_net)?;
                collect(maps::ALLOW_V6, self.allow_v6.iter(), &mut out, v6_net)?;
            }
            ListKind::Throttle => {
                collect(maps::THROTTLE_V4, self.throttle_v4.iter(), &mut out, v4_net)?;
                collect(maps::THROTTLE_V6, self.throttle_v6.iter(), &mut out, v6_net)?;
            }
        }
        Ok(out)
    }
}

/// The traffic counters: read-only for the daemon, so they need no lock and a long
/// walk of a million sources never holds up a list change.
pub struct Traffic {
    ip_stats: HashMap<MapData, IpKey, IpStats>,
    counters: PerCpuArray<MapData, ActionCounter>,
}

impl Traffic {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            ip_stats: take(ebpf, maps::IP_STATS)?,
            counters: take(ebpf, maps::IFACE_COUNTERS)?,
        })
    }

    /// Counters per action on interface `ifindex`, summed over CPUs.
    pub fn iface_counters(
        &self,
        ifindex: u32,
    ) -> Result<[ActionCounter; Action::COUNT], MapsError> {
        let mut totals = [ActionCounter::default(); Action::COUNT];
        for action in Action::ALL {
            let index = maps::counter_index(ifindex, action as u32);
            let per_cpu = self
                .counters
                .get(&index, 0)
                .map_err(|source| MapsError::Map {
                    name: maps::IFACE_COUNTERS,
                    source,
                })?;
            let total = &mut totals[action as usize];
            for value in per_cpu.iter() {
                total.packets += value.packets;
                total.bytes += value.bytes;
            }
        }
        Ok(totals)
    }

    /// Counters per action over every interface that ever ran the programs.
    pub fn counters(&self) -> Result<[ActionCounter; Action::COUNT], MapsError> {
        let mut totals = [ActionCounter::default(); Action::COUNT];
        for ifindex in 0..maps::COUNTER_IFACES {
            for (total, counter) in totals.iter_mut().zip(self.iface_counters(ifindex)?) {
                total.packets += counter.packets;
                total.bytes += counter.bytes;
            }
        }
        Ok(totals)
    }

    /// Every tracked source with its statistics (IPv4-mapped keys come back as IPv4).
    /// A walk that races LRU evictions can restart and meet a key twice: each source
    /// is reported once.
    pub fn sources(&self) -> Result<Vec<(IpAddr, IpStats)>, MapsError> {
        let mut out = std::collections::HashMap::new();
        for item in self.ip_stats.iter() {
            match item {
                Ok((key, stats)) => {
                    out.insert(cidr::canonical_addr(IpAddr::from(key)), stats);
                }
                // An LRU entry evicted while we walk: skip it, the walk goes on.
                Err(MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(MapsError::Map {
                        name: maps::IP_STATS,
                        source,
                    });
                }
            }
        }
        Ok(out.into_iter().collect())
    }
}
