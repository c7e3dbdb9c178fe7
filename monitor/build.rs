//! Builds the eBPF object with aya-build (nightly + bpf-linker) and leaves it in
//! OUT_DIR, where `loader.rs` embeds it into the `apimon` binary.
use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

/// Where `cargo xtask` installs the bpf-linker it builds against nightly's LLVM.
fn xtask_tool_dir() -> Option<PathBuf> {
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(cache.join("apimon").join("toolchain").join("bin"))
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    if let Some(dir) = xtask_tool_dir().filter(|dir| dir.join("bpf-linker").exists()) {
        let path = env::var_os("PATH").unwrap_or_default();
        let joined = env::join_paths(std::iter::once(dir).chain(env::split_paths(&path)))
            .context("joining PATH")?;
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("PATH", joined) };
    }
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is missing: run `cargo xtask build` once, which installs it for this nightly's LLVM"
        ));
    }
    let package = aya_build::Package {
        name: "monitor-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../monitor-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}
