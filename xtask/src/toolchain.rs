//! Makes sure the eBPF toolchain is on hand: nightly with rust-src, and a bpf-linker
//! built against nightly's own libLLVM. Idempotent; a stamp records what was built.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub struct Tools {
    bin_dir: PathBuf,
}

impl Tools {
    /// PATH with the project's tool dir first.
    pub fn path_with_tools(&self) -> OsString {
        let current = std::env::var_os("PATH").unwrap_or_default();
        std::env::join_paths(
            std::iter::once(self.bin_dir.clone()).chain(std::env::split_paths(&current)),
        )
        .unwrap_or(current)
    }
}

/// `$XDG_CACHE_HOME/apimon/toolchain` (or `~/.cache/...`); build.rs looks in the same place.
fn tool_root() -> Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .ok_or_else(|| anyhow!("neither XDG_CACHE_HOME nor HOME is set"))?;
    Ok(cache.join("apimon").join("toolchain"))
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rustup() -> Command {
    let mut command = Command::new("rustup");
    // Do not inherit the toolchain cargo chose for xtask itself.
    command.env_remove("RUSTUP_TOOLCHAIN");
    command
}

pub fn ensure() -> Result<Tools> {
    ensure_nightly_with_rust_src()?;
    let root = tool_root()?;
    let bin_dir = root.join("bin");
    ensure_bpf_linker(&root, &bin_dir)?;
    Ok(Tools { bin_dir })
}

fn ensure_nightly_with_rust_src() -> Result<()> {
    let toolchains = output(rustup().args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs (https://rustup.rs)")?;
    if !toolchains.lines().any(|line| line.starts_with(NIGHTLY)) {
        eprintln!("xtask: installing the nightly toolchain (needed for the eBPF target)");
        output(rustup().args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("the nightly Rust toolchain is missing and could not be installed")?;
    }
    let components =
        output(rustup().args(["component", "list", "--toolchain", NIGHTLY, "--installed"]))?;
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly (eBPF builds core from source)");
        output(rustup().args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
            .context("the nightly rust-src component is missing and could not be installed")?;
    }
    Ok(())
}

/// Nightly's sysroot, commit hash and LLVM major version.
fn nightly_llvm() -> Result<(PathBuf, String, u32)> {
    let sysroot = output(rustup().args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))?;
    let verbose = output(rustup().args(["run", NIGHTLY, "rustc", "-vV"]))?;
    let field = |name: &str| {
        verbose
            .lines()
            .find_map(|line| line.strip_prefix(name).map(|v| v.trim().to_owned()))
            .ok_or_else(|| anyhow!("`rustc +nightly -vV` has no {name}"))
    };
    let commit = field("commit-hash:")?;
    let llvm = field("LLVM version:")?;
    let major = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| anyhow!("unreadable LLVM version {llvm:?}"))?;
    Ok((PathBuf::from(sysroot.trim()), commit, major))
}

fn ensure_bpf_linker(root: &Path, bin_dir: &Path) -> Result<()> {
    let (sysroot, commit, llvm_major) = nightly_llvm()?;
    let stamp_path = root.join("bpf-linker.stamp");
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION} llvm-{llvm_major} rustc {commit}\n");
    let linker = bin_dir.join("bpf-linker");
    let current = std::fs::read_to_string(&stamp_path).unwrap_or_default();
    if current == stamp
        && Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }

    // rustc ships libLLVM as libLLVM.so.<major>.<minor>-rust-<version>; bpf-linker's
    // build wants <prefix>/lib/libLLVM.so, so a prefix of one symlink stands in for LLVM.
    let lib_dir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{llvm_major}.")))
        })
        .ok_or_else(|| {
            anyhow!(
                "nightly ships no libLLVM.so.{llvm_major}.* in {}",
                lib_dir.display()
            )
        })?;
    let prefix = root.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;

    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {llvm_major} (about 2 minutes, once)"
    );
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{llvm_major}"))
        .arg("--root")
        .arg(root)
        .arg("--force")
        .env("LLVM_PREFIX", &prefix)
        // Find rustc's libLLVM at run time without LD_LIBRARY_PATH.
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
        )
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("starting cargo install bpf-linker")?;
    if !status.success() {
        bail!(
            "building bpf-linker for LLVM {llvm_major} failed (see above); bpf-linker {BPF_LINKER_VERSION} must offer the llvm-{llvm_major} feature"
        );
    }
    std::fs::write(&stamp_path, stamp)?;
    Ok(())
}
