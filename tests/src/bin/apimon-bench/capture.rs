//! The capture programs on two CPUs at once (BPF_PROG_TEST_RUN): what one costs per
//! packet alone, and while the other CPU captures too, into another ring or the same.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Barrier, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};
use apimon_tests::{frames::Frame, testrun::TestDatapath};
use monitor::{
    capture::{CaptureMaps, RecordRing as _, SampleRings},
    config::CaptureSettings,
    loader,
};

/// Runs per BPF_PROG_TEST_RUN call: what two CPUs write between two drains fits the
/// test datapath's ring with room to spare (nothing is lost, which is checked).
const REPEAT: u32 = 100;
const CALLS: usize = 300;
const ROUNDS: usize = 9;

const REQUEST: &[u8] =
    b"GET /api/items/42 HTTP/1.1\r\nHost: api.example.com\r\nAccept: */*\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\n\
Content-Length: 17\r\nConnection: keep-alive\r\n\r\n{\"id\":42,\"ok\":1}\n";

pub struct Case {
    pub label: &'static str,
    /// Median over rounds of the mean ns per run on the measured CPU.
    pub ns: f64,
}

pub struct CaptureResult {
    pub cases: Vec<Case>,
}

fn pin(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

fn drain(rings: &Mutex<SampleRings>) {
    let mut rings = rings
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    while rings.requests.next_record().is_some() {}
    while rings.responses.next_record().is_some() {}
}

/// What one row measures: `program` on `frame` on CPU 1, with CPU 0 running the TC
/// ingress program on `other` meanwhile when given.
struct Setup<'a> {
    label: &'static str,
    program: &'static str,
    frame: &'a [u8],
    other: Option<&'a [u8]>,
}

/// One round of `setup` (mean ns per run on CPU 1). Each CPU drains the rings after each
/// of its calls, as the daemon would between polls.
fn round(dp: &TestDatapath, rings: &Mutex<SampleRings>, setup: &Setup<'_>) -> Result<f64> {
    let Setup {
        program,
        frame,
        other,
        ..
    } = *setup;
    let barrier = Barrier::new(2);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let other_cpu = scope.spawn(|| -> Result<usize> {
            pin(0)?;
            barrier.wait();
            let mut calls = 0;
            while let Some(frame) = other
                && !done.load(Ordering::Relaxed)
            {
                dp.run_tc(loader::INGRESS_TC_PROGRAM, frame, REPEAT);
                drain(rings);
                calls += 1;
            }
            Ok(calls)
        });
        let measured = (|| -> Result<f64> {
            pin(1)?;
            barrier.wait();
            let mut total = 0.0;
            for _ in 0..CALLS {
                total += dp.run_tc(program, frame, REPEAT).1;
                drain(rings);
            }
            Ok(total / CALLS as f64)
        })();
        done.store(true, Ordering::Relaxed);
        let calls = other_cpu
            .join()
            .map_err(|_| anyhow::anyhow!("the other CPU's thread panicked"))??;
        if other.is_some() && calls < CALLS / 10 {
            bail!("the other CPU ran {calls} calls: the two did not overlap");
        }
        measured
    })
}

pub fn run() -> Result<CaptureResult> {
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        bail!("the capture bench needs two CPUs");
    }
    let mut dp = TestDatapath::load();
    dp.maps.set_capture_enabled(true)?;
    let mut capture = CaptureMaps::new(&mut dp.ebpf)?;
    capture.configure(&CaptureSettings::default())?;
    let rings = Mutex::new(SampleRings::take(&mut dp.ebpf)?);
    let server = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let connection =
        |client: [u8; 4]| Frame::tcp(IpAddr::V4(Ipv4Addr::from(client)), server).established();
    // Two connections: the CPUs share rings (or not), never a connection's budget.
    let request = connection([198, 51, 100, 1]).build_with_payload(REQUEST);
    let response = connection([198, 51, 100, 1])
        .reply()
        .established()
        .build_with_payload(RESPONSE);
    let other_request = connection([198, 51, 100, 2]).build_with_payload(REQUEST);
    let setups = [
        Setup {
            label: "response (TC egress), alone",
            program: loader::EGRESS_PROGRAM,
            frame: &response,
            other: None,
        },
        Setup {
            label: "response (TC egress), the other CPU capturing requests",
            program: loader::EGRESS_PROGRAM,
            frame: &response,
            other: Some(&other_request),
        },
        Setup {
            label: "request (TC ingress), alone",
            program: loader::INGRESS_TC_PROGRAM,
            frame: &request,
            other: None,
        },
        Setup {
            label: "request (TC ingress), the other CPU capturing requests",
            program: loader::INGRESS_TC_PROGRAM,
            frame: &request,
            other: Some(&other_request),
        },
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(ROUNDS); setups.len()];
    for _ in 0..ROUNDS {
        for (index, setup) in setups.iter().enumerate() {
            samples[index].push(round(&dp, &rings, setup)?);
        }
    }
    let totals = capture.totals().context("reading the sample counters")?;
    if totals.lost > 0 || totals.captured == 0 {
        bail!(
            "{} samples captured, {} lost: the figures would not be of capture",
            totals.captured,
            totals.lost
        );
    }
    Ok(CaptureResult {
        cases: setups
            .iter()
            .zip(samples)
            .map(|(setup, ns)| Case {
                label: setup.label,
                ns: crate::median(ns),
            })
            .collect(),
    })
}

pub fn report(out: &mut String, result: &CaptureResult) -> std::fmt::Result {
    writeln!(
        out,
        "## Capture on two CPUs at once: ns per packet (BPF_PROG_TEST_RUN)"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "The capture programs on a {}-byte request and a {}-byte response (their payload copied \
         to a ring), on CPU 1: alone, and while CPU 0 runs the TC ingress program on another \
         connection's requests. Requests and responses go to separate rings, so a response \
         captured on one CPU and a request on another share nothing but the connection \
         budget map; two requests share their ring (its lock and producer position), as two \
         CPUs receiving requests do. Each figure: the median over {ROUNDS} rounds of the \
         kernel's mean time per run ({CALLS} calls of {REPEAT} runs per round), both CPUs \
         draining the rings after each call.",
        REQUEST.len(),
        RESPONSE.len()
    )?;
    writeln!(out)?;
    writeln!(out, "| packet captured on CPU 1 | ns per packet |")?;
    writeln!(out, "|---|---:|")?;
    for case in &result.cases {
        writeln!(out, "| {} | {:.0} |", case.label, case.ns)?;
    }
    writeln!(out)
}
