//! `cargo xtask`: everything a fresh machine needs, then build, run, test, bench, lint.
//!
//! The eBPF crate needs nightly with rust-src and a bpf-linker built against the same
//! LLVM major as nightly's rustc. No system LLVM of that version exists here, so
//! bpf-linker is linked against rustc's own libLLVM and installed into a cache dir
//! owned by this project (build.rs looks there too).

mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "apimon build chain")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (nightly rust-src, bpf-linker) if missing.
    Setup,
    /// Build everything (the eBPF object is embedded in `apimon`).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the daemon (`apimon run ARGS`), elevated with sudo when not root.
    Run {
        #[arg(long)]
        release: bool,
        /// Arguments for `apimon run`, after `--` (e.g. `-- --iface eth0`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit, BPF_PROG_TEST_RUN, network-namespace integration.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the datapath and write docs/benchmarks.md.
    Bench {
        /// Repeats per BPF_PROG_TEST_RUN measurement.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
    },
    /// Replay the labelled corpus (tests/corpus) through the detections and write the
    /// table in docs/detections.md.
    Eval,
    /// rustfmt and clippy (-D warnings), the eBPF crate on its own target.
    Lint,
}

fn main() -> std::process::ExitCode {
    match run_task(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_task(cli: Cli) -> Result<()> {
    let root = workspace_root();
    match cli.command {
        Task::Setup => toolchain::ensure().map(|_| ()),
        Task::Build { release } => build(&root, release),
        Task::Run { release, args } => {
            build(&root, release)?;
            let bin = root
                .join("target")
                .join(profile_dir(release))
                .join("apimon");
            let mut run_args = vec!["run".to_owned()];
            run_args.extend(args);
            elevated(&bin, &run_args)
        }
        Task::Test { args } => test(&root, &args),
        Task::Bench { repeat } => bench(&root, repeat),
        Task::Eval => eval(&root),
        Task::Lint => lint(&root),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn profile_dir(release: bool) -> &'static str {
    if release { "release" } else { "debug" }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A cargo command with the project's toolchain dir on PATH.
fn cargo(root: &Path, tools: &toolchain::Tools) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .current_dir(root)
        .env("PATH", tools.path_with_tools());
    command
}

fn run(command: &mut Command) -> Result<()> {
    let shown = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let status = command
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed: {status}");
    }
    Ok(())
}

fn build(root: &Path, release: bool) -> Result<()> {
    let tools = toolchain::ensure()?;
    let mut command = cargo(root, &tools);
    command.args([
        "build",
        "--workspace",
        "--exclude",
        "monitor-ebpf",
        "--bins",
    ]);
    if release {
        command.arg("--release");
    }
    run(&mut command)
}

/// Runs a built binary as root: directly when we are root, else through sudo.
fn elevated(bin: &Path, args: &[String]) -> Result<()> {
    let mut command = if is_root() {
        Command::new(bin)
    } else {
        eprintln!("xtask: not root; running {} with sudo", bin.display());
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(bin);
        sudo
    };
    command.args(args);
    run(&mut command)
}

/// Programs the integration tests drive, with the Debian package that brings each.
const TEST_PACKAGES: [(&str, &str); 4] = [
    ("nginx", "nginx-light"),
    ("curl", "curl"),
    ("wrk", "wrk"),
    ("promtool", "prometheus"),
];

/// Installs what the integration tests run (real servers and clients) when missing.
fn ensure_test_packages() -> Result<()> {
    let missing: Vec<&str> = TEST_PACKAGES
        .iter()
        .filter(|(program, _)| {
            !["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .any(|dir| Path::new(dir).join(program).exists())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing test dependencies: {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut command = if is_root() {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut command)
    };
    apt(&["update", "-qq"]).context("apt-get update (needed for the test dependencies)")?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install).with_context(|| format!("installing {}", missing.join(" ")))
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    ensure_test_packages()?;
    build(root, false)?;
    let tools = toolchain::ensure()?;
    let mut command = cargo(root, &tools);
    command.args(["test", "--workspace", "--exclude", "monitor-ebpf"]);
    if !is_root() {
        // Build as the invoking user; only the test binaries run elevated.
        eprintln!("xtask: not root; test binaries run with sudo");
        command.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    command.args(args).stdout(std::process::Stdio::piped());
    let mut child = command.spawn().context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(stdout) = child.stdout.take() {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some((p, f)) = parse_test_result(&line) {
                passed += p;
                failed += f;
            }
        }
    }
    let status = child.wait()?;
    // One closing line over every test binary, for people and CI alike.
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// `test result: ok. 15 passed; 0 failed; ...` -> (15, 0)
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let mut numbers = rest
        .split(';')
        .filter_map(|part| part.split_whitespace().rev().nth(1)?.parse::<u64>().ok());
    Some((numbers.next()?, numbers.next()?))
}

fn bench(root: &Path, repeat: u32) -> Result<()> {
    ensure_test_packages()?;
    let tools = toolchain::ensure()?;
    // The end-to-end section runs the release daemon next to the bench binary.
    run(cargo(root, &tools).args(["build", "--release", "-p", "monitor", "--bin", "apimon"]))?;
    run(cargo(root, &tools).args([
        "build",
        "--release",
        "-p",
        "apimon-tests",
        "--bin",
        "apimon-bench",
    ]))?;
    let bin = root.join("target/release/apimon-bench");
    let out = root.join("docs/benchmarks.md");
    elevated(
        &bin,
        &[
            "--repeat".into(),
            repeat.to_string(),
            "--out".into(),
            out.display().to_string(),
        ],
    )
}

/// Detection quality on the corpus: no privileges or kernel needed (the replay starts
/// at captured segments), so the eBPF toolchain is only needed because the monitor
/// crate embeds the kernel object.
fn eval(root: &Path) -> Result<()> {
    let tools = toolchain::ensure()?;
    run(cargo(root, &tools).args([
        "run",
        "--release",
        "-p",
        "apimon-tests",
        "--bin",
        "apimon-eval",
        "--",
        "--out",
        &root.join("docs/detections.md").display().to_string(),
    ]))
}

fn lint(root: &Path) -> Result<()> {
    let tools = toolchain::ensure()?;
    run(cargo(root, &tools).args(["fmt", "--all", "--check"]))?;
    run(cargo(root, &tools).args([
        "clippy",
        "--workspace",
        "--exclude",
        "monitor-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate on its own target: feature unification with userspace breaks it.
    run(Command::new("rustup")
        .current_dir(root.join("monitor-ebpf"))
        .env("PATH", tools.path_with_tools())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--bins",
            "--",
            "-D",
            "warnings",
        ]))
}
