//! Rebuild the eBPF object when the linker changes (a new nightly needs a new bpf-linker).
use which::which;

fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
