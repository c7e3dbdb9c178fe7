//! Decision to drop: from a client sending the request that breaks a policy limit to
//! the kernel holding the block that drops its next packet. The block's presence is
//! read from the pinned map the XDP program reads, polled every few microseconds.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use apimon_tests::{
    daemon::{Daemon, DaemonPaths},
    netns::Topology,
    nginx::Nginx,
};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use monitor_common::{datapath::ListEntry, maps};

/// Offenders measured, each from its own address.
const TRIALS: u8 = 200;
const FIRST_OFFENDER: u8 = 40;

const POLICY: &str = r#"
[[policy.rules]]
id = "one-per-hour"
action = "block"
ttl = "10m"
match.path = "/a"
rate_limit = { requests = 1, per = "1h" }
"#;

pub struct DecisionResult {
    /// Sorted, in microseconds.
    pub latencies_us: Vec<f64>,
}

impl DecisionResult {
    pub fn percentile(&self, p: f64) -> f64 {
        let n = self.latencies_us.len();
        let index = ((p / 100.0) * n as f64).ceil().max(1.0) as usize - 1;
        self.latencies_us[index.min(n - 1)]
    }
}

/// One request over its own connection from `source`; returns once it is written, and
/// reads the answer (if any) in the background.
fn request(source: Ipv4Addr) -> Result<()> {
    let mut stream = connect_from(source)?;
    stream.write_all(b"GET /a HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    Ok(())
}

/// A TCP connection to the server from `source` (std cannot bind before connecting).
fn connect_from(source: Ipv4Addr) -> Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    use std::os::fd::AsRawFd as _;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket")?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(source, 0)),
    )
    .with_context(|| format!("bind {source}"))?;
    let server = SockaddrIn::from(SocketAddrV4::new(Topology::SERVER_V4, 8080));
    connect(fd.as_raw_fd(), &server).with_context(|| format!("connect from {source}"))?;
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(stream)
}

pub fn run() -> Result<DecisionResult> {
    let topo = Topology::new();
    let _nginx = Nginx::start(&topo.server, &["10.77.0.1:8080"]);
    for i in 0..TRIALS {
        let status = Command::new("ip")
            .args(["-n", &topo.client.name, "addr", "add"])
            .arg(format!("10.77.0.{}/24", FIRST_OFFENDER + i))
            .args(["dev", &topo.client_if])
            .status()?;
        if !status.success() {
            bail!("adding client addresses failed");
        }
    }
    let paths = DaemonPaths::new();
    std::fs::write(paths.config_file(), POLICY)?;
    let pins = paths.bpffs_dir.clone();
    let daemon = Daemon::start_with(&topo.server, &topo.server_if, paths);
    let map = MapData::from_pin(pins.join(maps::BLOCK_V4_HOSTS))
        .context("opening the pinned blocklist")?;
    let blocklist: BpfHashMap<MapData, [u8; 4], ListEntry> =
        BpfHashMap::try_from(Map::HashMap(map)).context("blocklist map")?;
    let mut latencies_us = Vec::new();
    for i in 0..TRIALS {
        let source = Ipv4Addr::new(10, 77, 0, FIRST_OFFENDER + i);
        // Within the limit, then the request that breaks it.
        topo.client.run(move || request(source))?;
        std::thread::sleep(Duration::from_millis(20));
        let key = source.octets();
        let start = Instant::now();
        topo.client.run(move || request(source))?;
        let latency = loop {
            if blocklist.get(&key, 0).is_ok() {
                break start.elapsed();
            }
            if start.elapsed() > Duration::from_secs(2) {
                bail!("{source} was not blocked within 2 s:\n{}", daemon.log());
            }
            std::hint::spin_loop();
        };
        latencies_us.push(latency.as_secs_f64() * 1e6);
    }
    drop(daemon);
    latencies_us.sort_by(f64::total_cmp);
    Ok(DecisionResult { latencies_us })
}

pub fn report(out: &mut String, r: &DecisionResult) -> std::fmt::Result {
    writeln!(out, "## Decision to drop: policy verdict to kernel block")?;
    writeln!(out)?;
    writeln!(
        out,
        "{} clients, each from its own address, send one request within a limit of one per hour and \
         then the request that breaks it, over real TCP across the veth pair to nginx. Measured from just before \
         the client connects and writes that request (thread start and TCP handshake included) to the block being in the kernel map the XDP program reads \
         (polled in a tight loop from userspace): capture, ring buffer, reassembly, parsing, policy, \
         map update.",
        r.latencies_us.len()
    )?;
    writeln!(out)?;
    writeln!(out, "| p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |")?;
    writeln!(out, "|---:|---:|---:|---:|")?;
    writeln!(
        out,
        "| {:.2} | {:.2} | {:.2} | {:.2} |",
        r.percentile(50.0) / 1000.0,
        r.percentile(90.0) / 1000.0,
        r.percentile(99.0) / 1000.0,
        r.latencies_us.last().copied().unwrap_or(0.0) / 1000.0
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "Target (issue 4): p99 at most 10 ms: {} in this run.",
        crate::verdict(r.percentile(99.0) <= 10_000.0)
    )?;
    writeln!(out)
}
