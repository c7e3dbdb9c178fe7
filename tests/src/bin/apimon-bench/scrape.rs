//! Scrape latency of a busy daemon: `/metrics` (and `apimon stats`) with a million
//! sources tracked in the kernel, against the same daemon tracking none, in one run.

use std::{fmt::Write as _, time::Instant};

use anyhow::{Context as _, Result};
use apimon_tests::{
    daemon::{Daemon, DaemonPaths, METRICS_ADDR},
    netns::Topology,
};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use monitor_common::{
    datapath::{IpKey, IpStats},
    maps,
};

const SOURCES: u32 = 1_000_000;
const SCRAPES: usize = 21;

pub struct ScrapeResult {
    /// Median ms of a scrape, and of `apimon stats`: (idle daemon, a million sources).
    pub scrape_ms: (f64, f64),
    pub stats_ms: (f64, f64),
    pub bytes: usize,
    pub sources: u32,
}

fn median_ms(mut f: impl FnMut() -> usize) -> (f64, usize) {
    let mut times = Vec::with_capacity(SCRAPES);
    let mut size = 0;
    for _ in 0..SCRAPES {
        let start = Instant::now();
        size = f();
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    (crate::median(times), size)
}

pub fn run() -> Result<ScrapeResult> {
    let topo = Topology::new();
    let mut paths = DaemonPaths::new();
    paths.metrics_addr = METRICS_ADDR.into();
    let pins = paths.bpffs_dir.clone();
    let daemon = Daemon::start_with(&topo.server, &topo.server_if, paths);
    let measure = |daemon: &Daemon| {
        let scrape = median_ms(|| daemon.scrape().len());
        let stats = median_ms(|| daemon.cli_ok(&["stats", "--json"]).len());
        (scrape, stats.0)
    };
    let ((idle_scrape, _), idle_stats) = measure(&daemon);
    // A million sources, as the XDP program would have recorded them.
    let map = MapData::from_pin(pins.join(maps::IP_STATS)).context("pinned IP_STATS")?;
    let mut stats: BpfHashMap<MapData, IpKey, IpStats> =
        BpfHashMap::try_from(Map::LruHashMap(map)).context("IP_STATS")?;
    let entry = IpStats {
        packets: 10,
        bytes: 1000,
        last_seen_ns: 1,
        first_seen_ns: 1,
        ..IpStats::default()
    };
    for i in 0..SOURCES {
        let mut key = [0u8; 16];
        key[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        key[12..].copy_from_slice(&i.to_be_bytes());
        stats.insert(key, entry, 0).context("filling IP_STATS")?;
    }
    let ((busy_scrape, bytes), busy_stats) = measure(&daemon);
    Ok(ScrapeResult {
        scrape_ms: (idle_scrape, busy_scrape),
        stats_ms: (idle_stats, busy_stats),
        bytes,
        sources: SOURCES,
    })
}

pub fn report(out: &mut String, r: &ScrapeResult) -> std::fmt::Result {
    writeln!(out, "## Scrape latency of a busy daemon")?;
    writeln!(out)?;
    writeln!(
        out,
        "Median of {SCRAPES} requests each, from the daemon's namespace: `GET /metrics` ({} bytes) \
         and `apimon stats --json`, first with no source tracked, then with {} sources in the \
         kernel's per-source map. Neither walks that map: kernel counters are per interface and \
         action, read per CPU at scrape time.",
        r.bytes, r.sources
    )?;
    writeln!(out)?;
    writeln!(out, "| | no sources (ms) | {} sources (ms) |", r.sources)?;
    writeln!(out, "|---|---:|---:|")?;
    writeln!(
        out,
        "| GET /metrics | {:.2} | {:.2} |",
        r.scrape_ms.0, r.scrape_ms.1
    )?;
    writeln!(
        out,
        "| apimon stats | {:.2} | {:.2} |",
        r.stats_ms.0, r.stats_ms.1
    )?;
    writeln!(out)
}
