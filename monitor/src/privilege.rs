//! Once its programs are loaded and attached, the daemon keeps only the capabilities it
//! still uses: CAP_BPF (its maps and links) and CAP_NET_ADMIN (detaching on shutdown).
//! Everything else goes from every set, the bounding set included, so nothing the daemon
//! runs later (nor a compromise of it) can get it back.

use caps::{CapSet, Capability, CapsHashSet};
use thiserror::Error;

/// What the running daemon keeps.
pub const KEPT: [Capability; 2] = [Capability::CAP_BPF, Capability::CAP_NET_ADMIN];

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error("dropping capabilities: {0}")]
    Caps(String),
    #[error(
        "dropping capabilities: {0} threads run; capabilities are per thread, so every thread must start after the drop"
    )]
    Threads(usize),
}

/// Drops every capability but `KEPT` from the calling thread, which must be the only one.
pub fn keep_only_runtime_capabilities() -> Result<(), PrivilegeError> {
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, Iterator::count);
    if threads > 1 {
        return Err(PrivilegeError::Threads(threads));
    }
    let error = |e: caps::errors::CapsError| PrivilegeError::Caps(e.to_string());
    let keep: CapsHashSet = KEPT.into_iter().collect();
    // The bounding set first: that needs CAP_SETPCAP, which goes next. Without it (a
    // service manager already narrowed the bounding set) the other sets still shrink.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, cap).map_err(error)?;
            }
        }
    }
    // Nothing executed later can gain privileges back (setuid, file capabilities).
    nix::sys::prctl::set_no_new_privs().map_err(|e| PrivilegeError::Caps(e.to_string()))?;
    caps::clear(None, CapSet::Ambient).map_err(error)?;
    caps::clear(None, CapSet::Inheritable).map_err(error)?;
    caps::set(None, CapSet::Effective, &keep).map_err(error)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(error)?;
    Ok(())
}
