//! The kernel programs loaded privately (no pins, nothing attached) for
//! BPF_PROG_TEST_RUN on crafted frames.

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use monitor::{
    config::DatapathConfig,
    loader::{self, LoadOptions},
    maps::{Datapath, Traffic},
};
use monitor_common::datapath::{Action, ActionCounter};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

pub struct TestDatapath {
    pub ebpf: Ebpf,
    pub maps: Datapath,
    pub traffic: Traffic,
}

/// Bytes of each sample ring of a test datapath: small, as tests write few samples.
pub const RING_BYTES: u32 = 1 << 20;

impl TestDatapath {
    pub fn load() -> Self {
        Self::load_with(&DatapathConfig {
            ip_stats_capacity: 1024,
            blocklist_capacity: 1024,
            allowlist_capacity: 1024,
            ..DatapathConfig::default()
        })
    }

    pub fn load_with(capacities: &DatapathConfig) -> Self {
        crate::require_root();
        let mut ebpf = loader::load(&LoadOptions {
            pin_dir: None,
            capacities,
            ring_bytes: RING_BYTES,
        })
        .unwrap_or_else(|e| panic!("loading the datapath: {}", loader::error_chain(&e)));
        loader::load_program(&mut ebpf, loader::BASELINE_PROGRAM)
            .expect("loading the baseline program");
        let maps = Datapath::new(&mut ebpf).expect("datapath maps");
        let traffic = Traffic::new(&mut ebpf).expect("traffic maps");
        Self {
            ebpf,
            maps,
            traffic,
        }
    }

    /// Runs the ingress program once on `frame`; returns the XDP action.
    pub fn run(&self, frame: &[u8]) -> u32 {
        run_ingress(&self.ebpf, frame)
    }

    /// Runs a program `repeat` times; returns the action and the kernel's mean ns per run.
    pub fn run_program(&self, name: &str, frame: &[u8], repeat: u32) -> (u32, f64) {
        run_program(&self.ebpf, name, frame, repeat)
    }

    /// Runs a TC program `repeat` times on `frame`; returns its action and the kernel's
    /// mean ns per run.
    pub fn run_tc(&self, name: &str, frame: &[u8], repeat: u32) -> (u32, f64) {
        let program = self
            .ebpf
            .program(name)
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
            .unwrap_or_else(|| panic!("program {name}"));
        test_run(program, name, frame, repeat)
    }

    pub fn counter(&self, action: Action) -> ActionCounter {
        self.traffic.counters().expect("counters")[action as usize]
    }
}

/// Runs the ingress program of `ebpf` once on `frame` (for tests that handed the
/// maps to an `Enforcer`); returns the XDP action.
pub fn run_ingress(ebpf: &Ebpf, frame: &[u8]) -> u32 {
    run_program(ebpf, loader::INGRESS_PROGRAM, frame, 1).0
}

fn run_program(ebpf: &Ebpf, name: &str, frame: &[u8], repeat: u32) -> (u32, f64) {
    let program = ebpf
        .program(name)
        .and_then(|p| <&Xdp>::try_from(p).ok())
        .unwrap_or_else(|| panic!("program {name}"));
    test_run(program, name, frame, repeat)
}

fn test_run<P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>>(
    program: &P,
    name: &str,
    frame: &[u8],
    repeat: u32,
) -> (u32, f64) {
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name}: {}", loader::error_chain(&e)));
    (result.return_value, result.duration.as_nanos() as f64)
}
