//! Typed access to the datapath maps: the only place that knows their key layouts.

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
};
use ipnet::IpNet;
use monitor_common::{
    datapath::{Action, ActionCounter, IpKey, IpStats, ListEntry},
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
}

impl ListKind {
    pub const fn name(self) -> &'static str {
        match self {
            ListKind::Block => "blocklist",
            ListKind::Allow => "allowlist",
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
    ip_stats: HashMap<MapData, IpKey, IpStats>,
    counters: PerCpuArray<MapData, ActionCounter>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError>
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

fn ok_if_absent(name: &'static str, result: Result<(), MapError>) -> Result<(), MapsError> {
    optional(name, result).map(|_| ())
}

impl Datapath {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            block_v4_hosts: take(ebpf, maps::BLOCK_V4_HOSTS)?,
            block_v6_hosts: take(ebpf, maps::BLOCK_V6_HOSTS)?,
            block_v4_nets: take(ebpf, maps::BLOCK_V4_NETS)?,
            block_v6_nets: take(ebpf, maps::BLOCK_V6_NETS)?,
            allow_v4: take(ebpf, maps::ALLOW_V4)?,
            allow_v6: take(ebpf, maps::ALLOW_V6)?,
            ip_stats: take(ebpf, maps::IP_STATS)?,
            counters: take(ebpf, maps::ACTION_COUNTERS)?,
        })
    }

    /// Reads the kernel entry for `net`, if any.
    pub fn get(&self, list: ListKind, net: &IpNet) -> Result<Option<ListEntry>, MapsError> {
        let bits = u32::from(net.prefix_len());
        match (list, net, cidr::is_host(net)) {
            (ListKind::Block, IpNet::V4(v4), true) => optional(
                maps::BLOCK_V4_HOSTS,
                self.block_v4_hosts.get(&v4.addr().octets(), 0),
            ),
            (ListKind::Block, IpNet::V6(v6), true) => optional(
                maps::BLOCK_V6_HOSTS,
                self.block_v6_hosts.get(&v6.addr().octets(), 0),
            ),
            (ListKind::Block, IpNet::V4(v4), false) => optional(
                maps::BLOCK_V4_NETS,
                self.block_v4_nets
                    .get(&Key::new(bits, v4.addr().octets()), 0),
            ),
            (ListKind::Block, IpNet::V6(v6), false) => optional(
                maps::BLOCK_V6_NETS,
                self.block_v6_nets
                    .get(&Key::new(bits, v6.addr().octets()), 0),
            ),
            (ListKind::Allow, IpNet::V4(v4), _) => optional(
                maps::ALLOW_V4,
                self.allow_v4.get(&Key::new(bits, v4.addr().octets()), 0),
            ),
            (ListKind::Allow, IpNet::V6(v6), _) => optional(
                maps::ALLOW_V6,
                self.allow_v6.get(&Key::new(bits, v6.addr().octets()), 0),
            ),
        }
    }

    /// Writes the kernel entry for `net` (hosts of the blocklist go to the exact-match
    /// hash, everything else to the tries).
    pub fn put(&mut self, list: ListKind, net: &IpNet, entry: ListEntry) -> Result<(), MapsError> {
        let bits = u32::from(net.prefix_len());
        let (name, result) = match (list, net, cidr::is_host(net)) {
            (ListKind::Block, IpNet::V4(v4), true) => (
                maps::BLOCK_V4_HOSTS,
                self.block_v4_hosts.insert(v4.addr().octets(), entry, 0),
            ),
            (ListKind::Block, IpNet::V6(v6), true) => (
                maps::BLOCK_V6_HOSTS,
                self.block_v6_hosts.insert(v6.addr().octets(), entry, 0),
            ),
            (ListKind::Block, IpNet::V4(v4), false) => (
                maps::BLOCK_V4_NETS,
                self.block_v4_nets
                    .insert(&Key::new(bits, v4.addr().octets()), entry, 0),
            ),
            (ListKind::Block, IpNet::V6(v6), false) => (
                maps::BLOCK_V6_NETS,
                self.block_v6_nets
                    .insert(&Key::new(bits, v6.addr().octets()), entry, 0),
            ),
            (ListKind::Allow, IpNet::V4(v4), _) => (
                maps::ALLOW_V4,
                self.allow_v4
                    .insert(&Key::new(bits, v4.addr().octets()), entry, 0),
            ),
            (ListKind::Allow, IpNet::V6(v6), _) => (
                maps::ALLOW_V6,
                self.allow_v6
                    .insert(&Key::new(bits, v6.addr().octets()), entry, 0),
            ),
        };
        result.map_err(|source| MapsError::Map { name, source })
    }

    /// Removes the kernel entry for `net`; absent is fine.
    pub fn remove(&mut self, list: ListKind, net: &IpNet) -> Result<(), MapsError> {
        let bits = u32::from(net.prefix_len());
        match (list, net, cidr::is_host(net)) {
            (ListKind::Block, IpNet::V4(v4), true) => ok_if_absent(
                maps::BLOCK_V4_HOSTS,
                self.block_v4_hosts.remove(&v4.addr().octets()),
            ),
            (ListKind::Block, IpNet::V6(v6), true) => ok_if_absent(
                maps::BLOCK_V6_HOSTS,
                self.block_v6_hosts.remove(&v6.addr().octets()),
            ),
            (ListKind::Block, IpNet::V4(v4), false) => ok_if_absent(
                maps::BLOCK_V4_NETS,
                self.block_v4_nets
                    .remove(&Key::new(bits, v4.addr().octets())),
            ),
            (ListKind::Block, IpNet::V6(v6), false) => ok_if_absent(
                maps::BLOCK_V6_NETS,
                self.block_v6_nets
                    .remove(&Key::new(bits, v6.addr().octets())),
            ),
            (ListKind::Allow, IpNet::V4(v4), _) => ok_if_absent(
                maps::ALLOW_V4,
                self.allow_v4.remove(&Key::new(bits, v4.addr().octets())),
            ),
            (ListKind::Allow, IpNet::V6(v6), _) => ok_if_absent(
                maps::ALLOW_V6,
                self.allow_v6.remove(&Key::new(bits, v6.addr().octets())),
            ),
        }
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
        }
        Ok(out)
    }

    /// Global counters per action, summed over CPUs.
    pub fn counters(&self) -> Result<[ActionCounter; Action::COUNT], MapsError> {
        let mut totals = [ActionCounter::default(); Action::COUNT];
        for (index, total) in totals.iter_mut().enumerate() {
            let per_cpu =
                self.counters
                    .get(&(index as u32), 0)
                    .map_err(|source| MapsError::Map {
                        name: maps::ACTION_COUNTERS,
                        source,
                    })?;
            for value in per_cpu.iter() {
                total.packets += value.packets;
                total.bytes += value.bytes;
            }
        }
        Ok(totals)
    }

    /// Every tracked source with its statistics (IPv4-mapped keys come back as IPv4).
    pub fn sources(&self) -> Result<Vec<(IpAddr, IpStats)>, MapsError> {
        let mut out = Vec::new();
        for item in self.ip_stats.iter() {
            match item {
                Ok((key, stats)) => out.push((cidr::canonical_addr(IpAddr::from(key)), stats)),
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
        Ok(out)
    }
}
