//! `cargo xtask bench`: ns per packet of the XDP datapath through BPF_PROG_TEST_RUN, next
//! to an empty XDP program measured in the same run, with 10, 10k and 1M blocklist
//! entries (half exact hosts, half /24 prefixes). Writes a Markdown report.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use apimon_tests::{
    frames::Frame,
    testrun::{TestDatapath, XDP_DROP, XDP_PASS},
};
use ipnet::{IpNet, Ipv4Net};
use monitor::{config::DatapathConfig, loader, maps::ListKind};
use monitor_common::datapath::ListEntry;

const DEFAULT_SIZES: [u32; 3] = [10, 10_000, 1_000_000];
/// Each figure is the fastest of this many BPF_PROG_TEST_RUN calls: on a shared machine
/// noise only ever adds time, so the minimum is the most repeatable statistic.
const ROUNDS: usize = 11;
const HOST_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
const PREFIX_BASE: u32 = u32::from_be_bytes([16, 0, 0, 0]);

struct Args {
    repeat: u32,
    out: PathBuf,
    sizes: Vec<u32>,
    /// Skip the end-to-end section (quick runs while tuning the datapath).
    no_e2e: bool,
    /// Only the in-process pipeline section, printed (profiling the daemon's code).
    pipeline_only: bool,
    /// Only the end-to-end section, printed.
    e2e_only: bool,
    /// Only the decision-to-drop section, printed.
    decision_only: bool,
    /// Only the scrape-latency section, printed.
    scrape_only: bool,
    /// Only the two-CPU capture section, printed.
    capture_only: bool,
    /// `apimon` builds to compare under load instead (nothing else runs).
    compare: Vec<PathBuf>,
}

/// The comma-separated values of a flag's argument; `usage` when it is missing.
fn comma_list<T: std::str::FromStr>(arg: Option<String>, usage: &str) -> Result<Vec<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    arg.context(usage.to_owned())?
        .split(',')
        .map(|value| value.parse().with_context(|| format!("{usage}: {value:?}")))
        .collect()
}

fn parse_args() -> Result<Args> {
    let mut repeat = 1_000_000;
    let mut out = PathBuf::from("docs/benchmarks.md");
    let mut sizes = DEFAULT_SIZES.to_vec();
    let mut no_e2e = false;
    let mut pipeline_only = false;
    let mut e2e_only = false;
    let mut decision_only = false;
    let mut scrape_only = false;
    let mut capture_only = false;
    let mut compare = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--repeat" => repeat = args.next().context("--repeat N")?.parse()?,
            "--out" => out = PathBuf::from(args.next().context("--out FILE")?),
            "--no-e2e" => no_e2e = true,
            "--pipeline-only" => pipeline_only = true,
            "--e2e-only" => e2e_only = true,
            "--decision-only" => decision_only = true,
            "--scrape-only" => scrape_only = true,
            "--capture-only" => capture_only = true,
            "--compare" => {
                compare = comma_list(args.next(), "--compare BIN,BIN,...")?;
                if compare.len() < 2 {
                    bail!("--compare needs two or more apimon binaries, comma-separated");
                }
            }
            "--sizes" => sizes = comma_list(args.next(), "--sizes N,N,...")?,
            other => {
                bail!(
                    "unknown argument {other:?} (expected --repeat N, --out FILE, --sizes N,N, --no-e2e, --pipeline-only, --e2e-only, --decision-only, --scrape-only, --capture-only, --compare BIN,BIN)"
                )
            }
        }
    }
    Ok(Args {
        repeat,
        out,
        sizes,
        no_e2e,
        pipeline_only,
        e2e_only,
        decision_only,
        scrape_only,
        capture_only,
        compare,
    })
}

fn fastest(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

/// One BPF_PROG_TEST_RUN call: mean ns per run, checking the verdict.
fn run_once(
    dp: &TestDatapath,
    program: &str,
    frame: &[u8],
    expect: u32,
    repeat: u32,
) -> Result<f64> {
    let (verdict, ns) = dp.run_program(program, frame, repeat);
    if verdict != expect {
        bail!("{program} returned {verdict}, expected {expect}");
    }
    Ok(ns)
}

fn median(values: Vec<f64>) -> f64 {
    quantile(&sorted(values), 0.5)
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// The value a fraction `at` (0..=1) of the way through `sorted`; NaN for none.
fn quantile(sorted: &[f64], at: f64) -> f64 {
    let last = sorted.len().saturating_sub(1);
    sorted
        .get((last as f64 * at).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn fill(dp: &mut TestDatapath, entries: u32) -> Result<f64> {
    let entry = ListEntry {
        expires_at_ns: ListEntry::NEVER,
        hits: 0,
        reason: 1,
        rate_pps: 0,
    };
    let hosts = entries / 2;
    let start = Instant::now();
    for i in 0..hosts {
        let net = IpNet::from(IpAddr::V4(Ipv4Addr::from(HOST_BASE + i)));
        dp.maps.put(ListKind::Block, &net, entry)?;
    }
    for i in 0..entries - hosts {
        let net = IpNet::V4(Ipv4Net::new(Ipv4Addr::from(PREFIX_BASE + (i << 8)), 24)?);
        dp.maps.put(ListKind::Block, &net, entry)?;
    }
    Ok(f64::from(entries) / start.elapsed().as_secs_f64())
}

struct Row {
    entries: u32,
    inserts_per_s: f64,
    /// Median over rounds of pass_v4 / baseline measured back to back.
    pass_ratio: f64,
    /// Pass path with every list lookup (a source's first packet, or after a change).
    pass_v4_uncached: f64,
    uncached_ratio: f64,
    baseline: f64,
    pass_v4: f64,
    pass_v6: f64,
    drop_host: f64,
    drop_prefix: f64,
}

/// Runs on one CPU: BPF_PROG_TEST_RUN executes on the caller's CPU, and migrations
/// between rounds only add noise.
fn pin_to_last_cpu() -> Result<usize> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let cpu = cpus - 1;
    pin(cpu)?;
    Ok(cpu)
}

/// Runs the calling thread on `cpu` only.
fn pin(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// How a report states a target against this run's figure.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

mod capture;
mod decision;
mod e2e;
mod pipeline;
mod scrape;

/// Runs one section alone and prints its report.
fn print_only<R>(
    run: impl FnOnce() -> Result<R>,
    report: impl FnOnce(&mut String, &R) -> std::fmt::Result,
) -> Result<()> {
    let mut out = String::new();
    report(&mut out, &run()?)?;
    print!("{out}");
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if !args.compare.is_empty() {
        return print_only(
            || e2e::compare(&args.compare),
            |out, costs: &Vec<_>| e2e::report_comparison(out, costs),
        );
    }
    if args.scrape_only {
        return print_only(scrape::run, scrape::report);
    }
    if args.capture_only {
        return print_only(capture::run, capture::report);
    }
    if args.decision_only {
        return print_only(decision::run, decision::report);
    }
    if args.e2e_only {
        return print_only(e2e::run, e2e::report);
    }
    if args.pipeline_only {
        return print_only(pipeline::run, pipeline::report);
    }
    let machine = machine();
    // Before pinning: wrk, nginx and the daemon must spread over the CPUs as they would.
    eprintln!("bench: end to end with wrk and nginx");
    let end_to_end = if args.no_e2e { None } else { Some(e2e::run()?) };
    eprintln!("bench: decision to drop");
    let decision = decision::run()?;
    eprintln!("bench: scrape latency with a million sources");
    let scrape = scrape::run()?;
    eprintln!("bench: capture on two CPUs at once");
    let two_cpus = capture::run()?;
    let cpu = pin_to_last_cpu()?;
    eprintln!("bench: pinned to CPU {cpu}");
    eprintln!("bench: HTTP pipeline against plain httparse");
    let http = pipeline::run()?;
    eprintln!(
        "bench: pipeline {:.0} exchanges/s, httparse {:.0}/s ({:.2}x)",
        http.pipeline_rps, http.httparse_rps, http.ratio
    );
    let pass_v4 = Frame::v4([192, 0, 2, 99]).with_payload(64).build();
    let pass_v6 = Frame::v6("2001:db8::99").with_payload(64).build();
    let host_octets = (HOST_BASE + 1).to_be_bytes();
    let prefix_octets = (PREFIX_BASE + (2 << 8) + 7).to_be_bytes();
    let drop_host = Frame::v4(host_octets).with_payload(64).build();
    let drop_prefix = Frame::v4(prefix_octets).with_payload(64).build();

    let mut rows = Vec::new();
    for &entries in &args.sizes {
        eprintln!("bench: {entries} blocklist entries: filling the maps");
        let mut dp = TestDatapath::load_with(&DatapathConfig {
            ip_stats_capacity: 65_536,
            blocklist_capacity: entries.max(1024),
            allowlist_capacity: 1024,
            ..DatapathConfig::default()
        });
        let inserts_per_s = fill(&mut dp, entries)?;
        eprintln!(
            "bench: {entries} entries: measuring ({} repeats x {ROUNDS} rounds per figure)",
            args.repeat
        );
        let ingress = loader::INGRESS_PROGRAM;
        // Interleaved rounds: the empty program is measured right before the pass path
        // each time, so the ratio of a pair shares the machine's momentary load.
        let cases: [(&str, &[u8], u32); 5] = [
            (loader::BASELINE_PROGRAM, &pass_v4, XDP_PASS),
            (ingress, &pass_v4, XDP_PASS),
            (ingress, &pass_v6, XDP_PASS),
            (ingress, &drop_host, XDP_DROP),
            (ingress, &drop_prefix, XDP_DROP),
        ];
        let mut samples: [Vec<f64>; 5] = Default::default();
        let mut ratios = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            for (index, (program, frame, expect)) in cases.iter().enumerate() {
                samples[index].push(run_once(&dp, program, frame, *expect, args.repeat)?);
            }
            ratios.push(samples[1][samples[1].len() - 1] / samples[0][samples[0].len() - 1]);
        }
        // The same pass path without the per-source verdict cache.
        dp.maps.disable_verdict_cache()?;
        let mut uncached = Vec::with_capacity(ROUNDS);
        let mut uncached_ratios = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let empty = run_once(
                &dp,
                loader::BASELINE_PROGRAM,
                &pass_v4,
                XDP_PASS,
                args.repeat,
            )?;
            let pass = run_once(&dp, ingress, &pass_v4, XDP_PASS, args.repeat)?;
            uncached.push(pass);
            uncached_ratios.push(pass / empty);
        }
        let row = Row {
            entries,
            inserts_per_s,
            pass_ratio: median(ratios),
            pass_v4_uncached: fastest(&uncached),
            uncached_ratio: median(uncached_ratios),
            baseline: fastest(&samples[0]),
            pass_v4: fastest(&samples[1]),
            pass_v6: fastest(&samples[2]),
            drop_host: fastest(&samples[3]),
            drop_prefix: fastest(&samples[4]),
        };
        eprintln!(
            "bench: {entries}: empty {:.1} ns, pass {:.1} ns ({:.2}x), drop host {:.1} ns, drop prefix {:.1} ns",
            row.baseline, row.pass_v4, row.pass_ratio, row.drop_host, row.drop_prefix
        );
        rows.push(row);
    }
    let mut report = report(&rows, args.repeat, &machine)?;
    report.push('\n');
    capture::report(&mut report, &two_cpus)?;
    pipeline::report(&mut report, &http)?;
    decision::report(&mut report, &decision)?;
    scrape::report(&mut report, &scrape)?;
    if let Some(end_to_end) = &end_to_end {
        e2e::report(&mut report, end_to_end)?;
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &report)
        .with_context(|| format!("writing {}", args.out.display()))?;
    print!("{report}");
    eprintln!("bench: wrote {}", args.out.display());
    Ok(())
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    format!("Linux {}, {cpu}, {cpus} CPUs", kernel.trim())
}

fn report(rows: &[Row], repeat: u32, machine: &str) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "# Benchmarks")?;
    writeln!(out)?;
    writeln!(
        out,
        "Written by `cargo xtask bench`; numbers from one run on one machine ({machine}, measured on one pinned CPU)."
    )?;
    writeln!(
        out,
        "These machines are noisy: compare figures within a run, not across runs."
    )?;
    writeln!(out)?;
    writeln!(out, "## XDP datapath: ns per packet (BPF_PROG_TEST_RUN)")?;
    writeln!(out)?;
    writeln!(
        out,
        "Each figure is the kernel's mean time per run over {repeat} repeats, fastest of {ROUNDS} calls, \
         on a 118-byte TCP frame. The blocklist holds the given number of entries, half exact IPv4 hosts \
         (hash), half IPv4 /24 prefixes (LPM trie). *empty* is an XDP program that only returns \
         XDP_PASS, measured in the same run, right before the pass path in each round; *pass / empty* is \
         the median of those per-round ratios. *pass* is the steady state: the per-source LRU update, \
         with the source's pass verdict cached until the lists change. *uncached* is the same packet \
         with the cache off: the host-hash and prefix-trie lookups on every packet (a source's first \
         packet, or its first after any list change). The allowlist is empty, so the kernel skips it. \
         Drops are never cached: they look up the matching entry to count its hit."
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| blocklist entries | empty (ns) | pass IPv4 (ns) | pass / empty | pass IPv4, uncached (ns) | uncached / empty | pass IPv6 (ns) | drop, host (ns) | drop, prefix (ns) | map inserts/s |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for row in rows {
        writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.2}x | {:.1} | {:.1} | {:.1} | {:.0} |",
            row.entries,
            row.baseline,
            row.pass_v4,
            row.pass_ratio,
            row.pass_v4_uncached,
            row.uncached_ratio,
            row.pass_v6,
            row.drop_host,
            row.drop_prefix,
            row.inserts_per_s
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "Targets (issue 2): pass path at most 4x the empty program at 10k entries, at most 6x at 1M."
    )?;
    for (entries, limit) in [(10_000, 4.0), (1_000_000, 6.0)] {
        if let Some(row) = rows.iter().find(|row| row.entries == entries) {
            writeln!(
                out,
                "In this run at {entries} entries: {:.2}x, {}.",
                row.pass_ratio,
                verdict(row.pass_ratio <= limit)
            )?;
        }
    }
    Ok(out)
}
