//! End to end: wrk against nginx across a veth pair, without and with apimon attached
//! (blocklist datapath and HTTP capture on), measured back to back in one run.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use apimon_tests::{
    daemon::{Daemon, DaemonPaths, METRICS_ADDR, apimon_bin, metric_sum},
    netns::{NetNs, Topology},
    nginx::Nginx,
};

const URL: &str = "http://10.77.0.1:8080/a";
const DURATION: &str = "3s";
const CONNECTIONS: u32 = 32;
/// Rounds of one run per setup (short runs, many rounds: each monitored run is
/// compared with the unmonitored runs right before and after it, moments apart). The
/// machine's noise between runs is about as large as apimon's cost: the median needs
/// many rounds.
const ROUNDS: usize = 16;

#[derive(Clone, Copy, Debug, Default)]
pub struct WrkResult {
    pub requests_per_s: f64,
    pub p99_ms: f64,
    /// Responses wrk received.
    pub requests: f64,
}

/// One wrk run; with `delay_ms`, each connection waits that long between requests
/// (wrk has no rate option; its Lua `delay` hook paces it).
fn wrk(ns: &NetNs, connections: u32, delay_ms: Option<u32>) -> Result<WrkResult> {
    let script = delay_ms.map(|ms| {
        let path = std::env::temp_dir().join(format!("apimon-wrk-delay-{ms}.lua"));
        std::fs::write(&path, format!("function delay()\n  return {ms}\nend\n")).map(|()| path)
    });
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &ns.name, "wrk", "-t1", "-c"]);
    command
        .arg(connections.to_string())
        .args(["-d", DURATION, "--latency"]);
    if let Some(script) = script {
        command
            .arg("-s")
            .arg(script.context("writing the wrk script")?);
    }
    let output = command
        .arg(URL)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    if !output.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let requests_per_s = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("wrk printed no Requests/sec")?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(str::trim)
        .context("wrk printed no 99% latency")?;
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .context("wrk printed no request count")?;
    Ok(WrkResult {
        requests_per_s,
        p99_ms: parse_latency_ms(p99)?,
        requests,
    })
}

fn parse_latency_ms(text: &str) -> Result<f64> {
    let (number, unit): (String, String) =
        text.chars().partition(|c| c.is_ascii_digit() || *c == '.');
    let value: f64 = number
        .parse()
        .with_context(|| format!("latency {text:?}"))?;
    Ok(match unit.as_str() {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        other => bail!("unknown latency unit {other:?}"),
    })
}

/// How the monitored side ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    NoMonitor,
    Xdp,
    Tc,
    /// Issue 3's pipeline alone: capture, reassembly, parsing, metrics; no policy rules
    /// and no detections.
    TcObserving,
    /// The datapath alone (blocklist, counters): what capture's cost comes on top of.
    XdpCaptureOff,
    /// The default setup with the kernel's default scheduling policy for the daemon.
    XdpSchedOther,
}

impl Setup {
    const ALL: [Setup; 6] = [
        Setup::NoMonitor,
        Setup::Xdp,
        Setup::Tc,
        Setup::TcObserving,
        Setup::XdpCaptureOff,
        Setup::XdpSchedOther,
    ];
    /// The setups whose observations (what apimon saw, at full and half rate, and its
    /// kernel programs' cost) are reported.
    const CAPTURING: [Setup; 3] = [Setup::Xdp, Setup::Tc, Setup::TcObserving];

    fn run_args(self) -> &'static [&'static str] {
        match self {
            Setup::Tc | Setup::TcObserving => &["--ingress-hook", "tc"],
            Setup::NoMonitor | Setup::Xdp | Setup::XdpCaptureOff | Setup::XdpSchedOther => &[],
        }
    }

    /// The daemon's config file.
    fn config(self) -> &'static str {
        match self {
            Setup::TcObserving => "[policy]\nrules = []\n[policy.detections]\nenabled = false\n",
            Setup::XdpCaptureOff => "[capture]\nports = []\n",
            Setup::XdpSchedOther => "[daemon]\nscheduling_policy = \"other\"\n",
            Setup::NoMonitor | Setup::Xdp | Setup::Tc => "",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Setup::NoMonitor => "no monitor",
            Setup::Xdp => "apimon, XDP ingress",
            Setup::Tc => "apimon, TC ingress",
            Setup::TcObserving => "apimon, TC ingress, observing only",
            Setup::XdpCaptureOff => "apimon, XDP ingress, capture off",
            Setup::XdpSchedOther => "apimon, XDP ingress, SCHED_OTHER",
        }
    }
}

/// What apimon saw during one wrk run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observed {
    pub wrk: WrkResult,
    pub samples: u64,
    pub lost: u64,
    pub exchanges: f64,
    /// CPU the daemon used during the run, in seconds.
    pub daemon_cpu_s: f64,
}

/// Kernel programs' mean run time per packet during one full-speed run.
#[derive(Clone, Debug, Default)]
pub struct KernelCost {
    /// (program, ns per run, runs per exchange wrk completed).
    pub programs: Vec<(&'static str, f64, f64)>,
}

/// What a loaded program is, by the name the kernel keeps (15 characters).
fn program_label(name: &str) -> Option<&'static str> {
    match name {
        "apimon_ingress" => Some("XDP ingress"),
        "apimon_ingress_" => Some("TC ingress"),
        "apimon_egress" => Some("TC egress"),
        _ => None,
    }
}

/// Run time and runs so far of apimon's loaded programs: (id, label, time, runs).
fn program_totals() -> Result<Vec<(u32, &'static str, std::time::Duration, u64)>> {
    let mut totals = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("reading a loaded program's info")?;
        if let Some(label) = info.name_as_str().and_then(program_label) {
            totals.push((info.id(), label, info.run_time(), info.run_count()));
        }
    }
    Ok(totals)
}

/// One full-speed run of `setup` with the kernel's run-time statistics on (they add
/// two clock reads to each program run, so these runs stay out of the comparison).
fn kernel_cost(topo: &Topology, setup: Setup, binary: &Path) -> Result<KernelCost> {
    let _daemon = start_daemon(topo, setup, binary)?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("turning on the kernel's BPF run-time statistics")?;
    let before = program_totals()?;
    let result = wrk(&topo.client, CONNECTIONS, None)?;
    let after = program_totals()?;
    let programs = after
        .iter()
        .filter_map(|(id, label, time, runs)| {
            // By program id: a program left loaded by an earlier daemon has the same name.
            let (.., time_before, runs_before) = before.iter().find(|(i, ..)| i == id)?;
            let runs = runs.checked_sub(*runs_before)?;
            (runs > 0).then(|| {
                let ns = time.saturating_sub(*time_before).as_nanos() as f64 / runs as f64;
                (*label, ns, runs as f64 / result.requests)
            })
        })
        .collect();
    Ok(KernelCost { programs })
}

pub struct E2eResult {
    /// Best of the rounds at full speed, per setup (in `Setup::ALL` order).
    pub max_rate: Vec<(Setup, WrkResult)>,
    /// Per setup, its runs relative to the unmonitored runs around them.
    pub paired: Vec<Paired>,
    /// The last full-speed run of each monitored setup.
    pub at_max: Vec<(Setup, Observed)>,
    /// Paced runs at about half the unmonitored maximum.
    pub at_half: Vec<(Setup, Observed)>,
    pub half_connections: u32,
    /// Half the unmonitored maximum, requests/s.
    pub half_rate: f64,
    /// Per monitored setup, its kernel programs' cost at full speed.
    pub kernel: Vec<(Setup, KernelCost)>,
}

/// A setup's runs over the rounds, each relative to the unmonitored runs around it.
pub struct Paired {
    /// Median requests/s ratio.
    pub rps: f64,
    /// Median p99 ratio.
    pub p99: f64,
    /// First and third quartile of the requests/s ratios: the noise the median comes
    /// with. None for the unmonitored baseline.
    pub rps_middle_half: Option<(f64, f64)>,
}

/// Setups with apimon running: all but the first.
const MONITORED: usize = Setup::ALL.len() - 1;

/// The highest rate and the lowest p99 seen so far.
fn keep_best(best: &mut WrkResult, result: WrkResult) {
    if result.requests_per_s > best.requests_per_s {
        best.requests_per_s = result.requests_per_s;
    }
    if best.p99_ms == 0.0 || result.p99_ms < best.p99_ms {
        best.p99_ms = result.p99_ms;
    }
}

/// Requests apimon counted so far (all series).
fn exchanges_counted(daemon: &Daemon) -> f64 {
    metric_sum(&daemon.scrape(), "apimon_http_requests_total")
}

/// A fresh daemon with `setup`'s arguments and config, on the server's interface.
fn start_daemon(topo: &Topology, setup: Setup, binary: &Path) -> Result<Daemon> {
    let mut paths = DaemonPaths::new();
    paths.binary = binary.to_owned();
    paths.metrics_addr = METRICS_ADDR.into();
    paths.run_args = setup.run_args().iter().map(|a| (*a).to_owned()).collect();
    std::fs::write(paths.config_file(), setup.config()).context("writing the config")?;
    Ok(Daemon::start_with(&topo.server, &topo.server_if, paths))
}

/// One wrk run against a fresh daemon of `setup`, with what it observed.
fn observed_run(
    topo: &Topology,
    setup: Setup,
    connections: u32,
    delay_ms: Option<u32>,
    binary: &Path,
) -> Result<Observed> {
    let daemon = start_daemon(topo, setup, binary)?;
    // A missing figure must not read as zero loss.
    let samples = |daemon: &Daemon| -> Result<(u64, u64)> {
        let stats = daemon.cli_json(&["stats"]);
        let read = |field: &str| {
            stats["samples"][field]
                .as_u64()
                .with_context(|| format!("apimon stats has no samples.{field}"))
        };
        Ok((read("captured")?, read("lost")?))
    };
    let (captured_before, lost_before) = samples(&daemon)?;
    let counted_before = exchanges_counted(&daemon);
    let cpu = |daemon: &Daemon| daemon.cpu_time().map_or(f64::NAN, |t| t.as_secs_f64());
    let cpu_before = cpu(&daemon);
    let wrk = wrk(&topo.client, connections, delay_ms)?;
    let daemon_cpu_s = cpu(&daemon) - cpu_before;
    // wrk closes its connections at the end; give the pipeline a moment to finish them.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (captured, lost) = samples(&daemon)?;
    Ok(Observed {
        wrk,
        samples: captured - captured_before,
        lost: lost - lost_before,
        exchanges: exchanges_counted(&daemon) - counted_before,
        daemon_cpu_s,
    })
}

pub fn run() -> Result<E2eResult> {
    let binary = apimon_bin();
    let topo = Topology::new();
    let _nginx = Nginx::start(&topo.server, &["10.77.0.1:8080"]);
    let mut max_rate: Vec<(Setup, WrkResult)> = Setup::ALL
        .iter()
        .map(|s| (*s, WrkResult::default()))
        .collect();
    let mut at_max = Vec::new();
    let mut ratios: Vec<Vec<(f64, f64)>> = vec![Vec::new(); Setup::ALL.len()];
    // Every monitored run sits between two unmonitored ones and is compared with their
    // mean: a machine slowing down or speeding up across the three cancels out.
    let unmonitored = |best: &mut WrkResult| -> Result<WrkResult> {
        let result = wrk(&topo.client, CONNECTIONS, None)?;
        keep_best(best, result);
        Ok(result)
    };
    // The baseline against itself.
    ratios[0].push((1.0, 1.0));
    let mut before = unmonitored(&mut max_rate[0].1)?;
    for round in 0..ROUNDS {
        // The order rotates from round to round: no setup always runs first or last.
        for step in 0..MONITORED {
            let index = 1 + (round + step) % MONITORED;
            let setup = Setup::ALL[index];
            eprintln!(
                "bench: e2e round {} of {ROUNDS}: {}",
                round + 1,
                setup.name()
            );
            // What apimon saw is reported for the last round's capturing setups; the
            // other runs need only wrk's figures.
            let result = if round == ROUNDS - 1 && Setup::CAPTURING.contains(&setup) {
                let observed = observed_run(&topo, setup, CONNECTIONS, None, &binary)?;
                let result = observed.wrk;
                at_max.push((setup, observed));
                result
            } else {
                let _daemon = start_daemon(&topo, setup, &binary)?;
                wrk(&topo.client, CONNECTIONS, None)?
            };
            let after = unmonitored(&mut max_rate[0].1)?;
            ratios[index].push((
                2.0 * result.requests_per_s / (before.requests_per_s + after.requests_per_s),
                2.0 * result.p99_ms / (before.p99_ms + after.p99_ms),
            ));
            keep_best(&mut max_rate[index].1, result);
            before = after;
        }
    }
    at_max.sort_by_key(|(setup, _)| Setup::ALL.iter().position(|s| s == setup));
    let paired = ratios
        .iter()
        .enumerate()
        .map(|(index, rounds)| {
            let rps = crate::sorted(rounds.iter().map(|r| r.0).collect());
            Paired {
                rps: crate::quantile(&rps, 0.5),
                p99: crate::median(rounds.iter().map(|r| r.1).collect()),
                rps_middle_half: (Setup::ALL[index] != Setup::NoMonitor)
                    .then(|| (crate::quantile(&rps, 0.25), crate::quantile(&rps, 0.75))),
            }
        })
        .collect();
    // Half the unmonitored maximum, paced: each connection waits HALF_DELAY_MS between
    // requests (wrk's delay takes whole milliseconds); the number of connections is
    // calibrated without apimon so the rate lands near half.
    let half_rate = max_rate[0].1.requests_per_s / 2.0;
    let guess = (half_rate * f64::from(HALF_DELAY_MS) / 1000.0)
        .round()
        .max(1.0);
    eprintln!("bench: e2e calibrating the half rate");
    let reached = wrk(&topo.client, guess as u32, Some(HALF_DELAY_MS))?.requests_per_s;
    let half_connections = (guess * half_rate / reached).round().max(1.0) as u32;
    let mut at_half = Vec::new();
    for setup in Setup::CAPTURING {
        eprintln!("bench: e2e at half rate: {}", setup.name());
        at_half.push((
            setup,
            observed_run(&topo, setup, half_connections, Some(HALF_DELAY_MS), &binary)?,
        ));
    }
    let mut kernel = Vec::new();
    for setup in Setup::CAPTURING {
        eprintln!("bench: e2e kernel programs' cost: {}", setup.name());
        kernel.push((setup, kernel_cost(&topo, setup, &binary)?));
    }
    Ok(E2eResult {
        max_rate,
        paired,
        at_max,
        at_half,
        half_connections,
        half_rate,
        kernel,
    })
}

/// Pause between requests on each connection of the paced run.
const HALF_DELAY_MS: u32 = 2;

pub fn report(out: &mut String, r: &E2eResult) -> std::fmt::Result {
    writeln!(out, "## End to end: wrk against nginx across a veth pair")?;
    writeln!(out)?;
    writeln!(
        out,
        "wrk (1 thread, {CONNECTIONS} keep-alive connections, {DURATION}) from a client namespace to nginx \
         (a 6-byte static file) in a server namespace. Each of {ROUNDS} rounds runs every monitored setup once, \
         in an order that rotates from round to round, with an unmonitored run before and after each; best of \
         the runs for each. apimon runs with its defaults \
         (blocklist datapath, HTTP capture on port 8080 with TC egress, reassembly, parsing, metrics, the \
         built-in policy rule, which fires on every request of this single client, and detections on every \
         exchange), its ingress datapath at XDP or at TC. *Observing only* is issue 3's pipeline alone: \
         the same without policy rules and detections. *Capture off* is the datapath alone \
         (`capture.ports = []`): the share of the cost that is not capture's. *SCHED_OTHER* is the \
         default setup with the daemon under the kernel's default scheduling policy \
         (`daemon.scheduling_policy = \"other\"`) instead of apimon's default, `SCHED_BATCH`."
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| | requests/s (best) | p99 latency (ms, best) | requests/s vs no monitor | middle half of the rounds | p99 vs no monitor |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    for ((setup, result), paired) in r.max_rate.iter().zip(&r.paired) {
        let middle_half = paired
            .rps_middle_half
            .map_or("-".to_owned(), |(low, high)| {
                format!(
                    "{:+.1}% to {:+.1}%",
                    (low - 1.0) * 100.0,
                    (high - 1.0) * 100.0
                )
            });
        writeln!(
            out,
            "| {} | {:.0} | {:.2} | {:+.1}% | {middle_half} | {:+.1}% |",
            setup.name(),
            result.requests_per_s,
            result.p99_ms,
            (paired.rps - 1.0) * 100.0,
            (paired.p99 - 1.0) * 100.0
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "Each monitored run is compared with the mean of the unmonitored runs right before and right \
         after it (so the machine slowing down or speeding up across the three cancels out); the changes \
         are the medians of those ratios over the rounds, and the middle half of the rounds lies between \
         their first and third quartiles."
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "What apimon saw (last round at full speed; then paced at about half the unmonitored maximum, \
         {:.0} requests/s: {} connections, {HALF_DELAY_MS} ms between requests on each):",
        r.half_rate, r.half_connections
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| run | requests/s | responses wrk got | exchanges apimon counted | samples | samples lost | daemon CPU (% of a core) | daemon CPU per sample (µs) |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for (label, runs) in [("max rate", &r.at_max), ("half rate", &r.at_half)] {
        for (setup, o) in runs {
            let seconds = o.wrk.requests / o.wrk.requests_per_s;
            writeln!(
                out,
                "| {label}, {} | {:.0} | {:.0} | {:.0} | {} | {} | {:.1} | {:.2} |",
                setup.name(),
                o.wrk.requests_per_s,
                o.wrk.requests,
                o.exchanges,
                o.samples,
                o.lost,
                o.daemon_cpu_s / seconds * 100.0,
                o.daemon_cpu_s * 1e6 / o.samples as f64
            )?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "wrk counts responses completed within its run; apimon also counts the requests in flight when \
         wrk stops (answered, or ended by wrk closing the connection). \
         Targets (issue 3): at most 5% fewer requests/s and at most 10% higher p99; zero loss at half \
         the maximum rate."
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "Where the kernel's share goes: one more full-speed run of each setup with the kernel's \
         BPF run-time statistics on (they add two clock reads to each program run, so these runs are \
         not in the comparison above). Runs per exchange count every packet the program saw \
         (requests, responses and ACKs)."
    )?;
    writeln!(out)?;
    writeln!(out, "| setup | program | ns per run | runs per exchange |")?;
    writeln!(out, "|---|---|---:|---:|")?;
    for (setup, cost) in &r.kernel {
        for (program, ns, per_exchange) in &cost.programs {
            writeln!(
                out,
                "| {} | {program} | {ns:.0} | {per_exchange:.2} |",
                setup.name()
            )?;
        }
    }
    writeln!(out)?;
    for ((setup, _), paired) in r.max_rate.iter().zip(&r.paired).skip(1) {
        let lost: u64 = r
            .at_half
            .iter()
            .filter(|(s, _)| s == setup)
            .map(|(_, o)| o.lost)
            .sum();
        let loss = if Setup::CAPTURING.contains(setup) {
            format!(", zero loss at half rate {}", crate::verdict(lost == 0))
        } else {
            String::new()
        };
        writeln!(
            out,
            "- {}: requests/s {}, p99 {}{loss}.",
            setup.name(),
            crate::verdict(paired.rps >= 0.95),
            crate::verdict(paired.p99 <= 1.10),
        )?;
    }
    writeln!(out)
}

/// Rounds of a comparison: each binary runs once per round, in an order that reverses
/// from round to round.
const COMPARE_ROUNDS: usize = 5;

/// What one `apimon` build cost under wrk at full speed (default setup, XDP ingress),
/// per round.
pub struct BuildCost {
    pub binary: PathBuf,
    pub ingress_ns: Vec<f64>,
    pub egress_ns: Vec<f64>,
    pub daemon_ns_per_sample: Vec<f64>,
}

/// Runs two or more `apimon` builds alternately under the same load: the kernel
/// programs' ns per packet (with BPF run-time statistics) and the daemon's CPU per
/// sample, paired round by round. On a noisy machine, the one way to tell a change of
/// some percent in apimon's cost from the machine's drift.
pub fn compare(binaries: &[PathBuf]) -> Result<Vec<BuildCost>> {
    let topo = Topology::new();
    let _nginx = Nginx::start(&topo.server, &["10.77.0.1:8080"]);
    let mut costs: Vec<BuildCost> = binaries
        .iter()
        .map(|binary| BuildCost {
            binary: binary.clone(),
            ingress_ns: Vec::new(),
            egress_ns: Vec::new(),
            daemon_ns_per_sample: Vec::new(),
        })
        .collect();
    for round in 0..COMPARE_ROUNDS {
        let mut order: Vec<usize> = (0..costs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let cost = &mut costs[index];
            eprintln!(
                "bench: compare round {} of {COMPARE_ROUNDS}: {}",
                round + 1,
                cost.binary.display()
            );
            // Two runs: the kernel's run-time statistics slow its programs, and so the
            // load the daemon sees. A run without samples has no cost per sample (NaN).
            let observed = observed_run(&topo, Setup::Xdp, CONNECTIONS, None, &cost.binary)?;
            cost.daemon_ns_per_sample.push(if observed.samples == 0 {
                f64::NAN
            } else {
                observed.daemon_cpu_s * 1e9 / observed.samples as f64
            });
            let kernel = kernel_cost(&topo, Setup::Xdp, &cost.binary)?;
            let ns = |label: &str| {
                kernel
                    .programs
                    .iter()
                    .find(|(l, ..)| *l == label)
                    .map_or(f64::NAN, |(_, ns, _)| *ns)
            };
            cost.ingress_ns.push(ns("XDP ingress"));
            cost.egress_ns.push(ns("TC egress"));
        }
    }
    Ok(costs)
}

pub fn report_comparison(out: &mut String, costs: &[BuildCost]) -> std::fmt::Result {
    writeln!(
        out,
        "| build | XDP ingress (ns per packet) | TC egress (ns per packet) | daemon CPU per sample (ns) |"
    )?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for cost in costs {
        writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} |",
            cost.binary.display(),
            crate::median(cost.ingress_ns.clone()),
            crate::median(cost.egress_ns.clone()),
            crate::median(cost.daemon_ns_per_sample.clone()),
        )?;
    }
    writeln!(
        out,
        "\nMedians of {COMPARE_ROUNDS} rounds; each round runs every build once under wrk at full speed (default setup, XDP ingress), in an order that reverses from round to round."
    )
}
