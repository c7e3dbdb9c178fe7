//! Loads the embedded eBPF object, pins its maps so that a restarted daemon adopts the
//! same state, and attaches the XDP program through pinned bpf_links: a daemon killed
//! with SIGKILL leaves the datapath enforcing, and the next one swaps its program in
//! atomically (no window in which blocked traffic passes).

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::MapInfo,
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use monitor_common::maps;
use thiserror::Error;
use tracing::{info, warn};

use crate::config::{DatapathConfig, XdpModeSetting};

/// The kernel programs, built by build.rs and embedded in the binary.
pub const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

pub const INGRESS_PROGRAM: &str = "apimon_ingress";
pub const EGRESS_PROGRAM: &str = "apimon_egress";
/// The ingress datapath at TC, for `ingress_hook = "tc"`.
pub const INGRESS_TC_PROGRAM: &str = "apimon_ingress_tc";
/// An XDP program that only passes: the benchmark's baseline.
pub const BASELINE_PROGRAM: &str = "apimon_baseline";

/// bpffs superblock magic (linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

#[derive(Debug, Error)]
pub enum LoaderError {
    #[error("cannot prepare the bpffs pin directory {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] EbpfError),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("loading program {name} failed (verifier log above): {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("attaching XDP to {iface} failed: {reason}")]
    Attach { iface: String, reason: String },
    #[error("detaching XDP from {iface} failed: {reason}")]
    Detach { iface: String, reason: String },
}

/// Makes sure `dir` lives on a bpf filesystem, mounting bpffs at /sys/fs/bpf when the
/// host has not (it is not mounted at boot everywhere), then creates `dir`.
pub fn prepare_pin_dir(dir: &Path) -> Result<(), LoaderError> {
    let error = |reason: String| LoaderError::Bpffs {
        path: dir.to_owned(),
        reason,
    };
    if dir.starts_with(BPFFS_MOUNT_POINT) && !is_bpffs(Path::new(BPFFS_MOUNT_POINT)) {
        fs::create_dir_all(BPFFS_MOUNT_POINT).map_err(|e| error(e.to_string()))?;
        nix::mount::mount(
            Some("bpf"),
            BPFFS_MOUNT_POINT,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| error(format!("mounting bpffs at {BPFFS_MOUNT_POINT}: {e}")))?;
        info!(path = BPFFS_MOUNT_POINT, "Mounted bpffs");
    }
    fs::create_dir_all(dir.join("links")).map_err(|e| error(e.to_string()))?;
    if !is_bpffs(dir) {
        return Err(error(
            "not on a bpf filesystem (mount -t bpf bpf DIR)".into(),
        ));
    }
    Ok(())
}

/// Holds an exclusive lock on the pin directory for the daemon's lifetime: two daemons
/// sharing pinned maps would overwrite each other's lists.
pub fn lock_pin_dir(dir: &Path) -> Result<nix::fcntl::Flock<fs::File>, LoaderError> {
    let error = |reason: String| LoaderError::Bpffs {
        path: dir.to_owned(),
        reason,
    };
    let file = fs::File::open(dir).map_err(|e| error(e.to_string()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                error("another apimon daemon is using it".into())
            } else {
                error(format!("locking: {errno}"))
            }
        },
    )
}

#[allow(
    clippy::unnecessary_cast,
    reason = "f_type's width differs between architectures"
)]
fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type().0 as i64 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// How the object is loaded: pinned (the daemon) or private (tests, benchmarks).
pub struct LoadOptions<'a> {
    pub pin_dir: Option<&'a Path>,
    pub capacities: &'a DatapathConfig,
    /// Size of each of the two sample rings (a power of two of at least a page).
    pub ring_bytes: u32,
}

/// Loads the object with map sizes from the config, reusing maps already pinned under
/// `pin_dir`, and loads the ingress program into the kernel (not yet attached).
pub fn load(options: &LoadOptions<'_>) -> Result<Ebpf, LoaderError> {
    let capacities = options.capacities;
    let pin_paths: Vec<(&str, PathBuf)> = options
        .pin_dir
        .map(|dir| {
            maps::PINNED
                .iter()
                .map(|name| (*name, dir.join(name)))
                .collect()
        })
        .unwrap_or_default();
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(maps::IP_STATS, capacities.ip_stats_capacity)
        .map_max_entries(maps::RATE_STATE, capacities.ip_stats_capacity)
        .map_max_entries(maps::BLOCK_V4_HOSTS, capacities.blocklist_capacity)
        .map_max_entries(maps::BLOCK_V6_HOSTS, capacities.blocklist_capacity)
        .map_max_entries(maps::BLOCK_V4_NETS, capacities.blocklist_capacity)
        .map_max_entries(maps::BLOCK_V6_NETS, capacities.blocklist_capacity)
        .map_max_entries(maps::ALLOW_V4, capacities.allowlist_capacity)
        .map_max_entries(maps::ALLOW_V6, capacities.allowlist_capacity)
        .map_max_entries(maps::REQUEST_SAMPLES, options.ring_bytes)
        .map_max_entries(maps::RESPONSE_SAMPLES, options.ring_bytes);
    for (name, path) in &pin_paths {
        warn_on_capacity_change(name, path, capacities);
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    load_program(&mut ebpf, INGRESS_PROGRAM)?;
    for name in [EGRESS_PROGRAM, INGRESS_TC_PROGRAM] {
        typed_program::<SchedClassifier>(&mut ebpf, name)?
            .load()
            .map_err(|source| LoaderError::Program { name, source })?;
    }
    Ok(ebpf)
}

/// A pinned map keeps the size it was created with; say so when the config asks otherwise.
fn warn_on_capacity_change(name: &str, path: &Path, capacities: &DatapathConfig) {
    let Ok(info) = MapInfo::from_pin(path) else {
        return;
    };
    let wanted = match name {
        maps::IP_STATS | maps::RATE_STATE => capacities.ip_stats_capacity,
        maps::THROTTLE_V4 | maps::THROTTLE_V6 => return,
        maps::ALLOW_V4 | maps::ALLOW_V6 => capacities.allowlist_capacity,
        maps::IFACE_COUNTERS => return,
        _ => capacities.blocklist_capacity,
    };
    if info.max_entries() != wanted {
        warn!(
            map = name,
            pinned = info.max_entries(),
            configured = wanted,
            "Pinned map keeps its old capacity; remove the pin directory while stopped to resize"
        );
    }
}

/// Loads one XDP program of the object into the kernel.
pub fn load_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Xdp, LoaderError> {
    let program = typed_program::<Xdp>(ebpf, name)?;
    program
        .load()
        .map_err(|source| LoaderError::Program { name, source })?;
    Ok(program)
}

/// A program of the object, as its type.
fn typed_program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, LoaderError>
where
    &'a mut aya::programs::Program: TryInto<&'a mut P, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoaderError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoaderError::Program { name, source })
}

/// The XDP mode an attachment ended up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Skb,
    /// The ingress datapath at TC (TCX), instead of XDP.
    TcIngress,
    /// The egress capture program, attached through TCX.
    TcEgress,
}

impl AttachedMode {
    pub const fn name(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Skb => "skb",
            AttachedMode::TcIngress => "tc-ingress",
            AttachedMode::TcEgress => "tc-egress",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "native" => Some(AttachedMode::Native),
            "skb" => Some(AttachedMode::Skb),
            _ => None,
        }
    }
}

/// The program attached to one interface through a bpf_link pinned at `pin`
/// (`<pin_dir>/links/xdp-<iface>-<mode>`), so it outlives a crashed daemon.
pub struct Attachment {
    pub iface: String,
    pub ifindex: u32,
    pub mode: AttachedMode,
    /// Taken over from an earlier daemon rather than created by this one.
    pub adopted: bool,
    link: Option<FdLink>,
    pin: Option<PathBuf>,
}

impl Attachment {
    /// Lets go of the link but leaves it pinned: the program stays attached.
    pub fn release(mut self) {
        self.pin = None;
        drop(self.link.take());
    }

    /// Detaches: removes the pin, then closes the last link fd.
    pub fn detach(mut self) -> Result<(), LoaderError> {
        if let Some(pin) = self.pin.take()
            && let Err(e) = fs::remove_file(&pin)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(LoaderError::Detach {
                iface: self.iface.clone(),
                reason: format!("removing {}: {e}", pin.display()),
            });
        }
        drop(self.link.take());
        Ok(())
    }
}

fn link_pin_path(pin_dir: &Path, iface: &str, mode: AttachedMode) -> PathBuf {
    pin_dir
        .join("links")
        .join(format!("xdp-{iface}-{}", mode.name()))
}

/// A link pinned by an earlier daemon for `iface`, if any.
fn find_pinned_link(pin_dir: &Path, iface: &str) -> Option<(PathBuf, AttachedMode)> {
    let prefix = format!("xdp-{iface}-");
    fs::read_dir(pin_dir.join("links"))
        .ok()?
        .filter_map(Result::ok)
        .find_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let mode = AttachedMode::from_name(name.strip_prefix(&prefix)?)?;
            Some((entry.path(), mode))
        })
}

/// Attaches the ingress program to `iface`. A link pinned by an earlier daemon is
/// updated in place; otherwise native mode is tried first (for `auto`), then skb.
pub fn attach(
    ebpf: &mut Ebpf,
    iface: &str,
    requested: XdpModeSetting,
    pin_dir: &Path,
) -> Result<Attachment, LoaderError> {
    let attach_error = |reason: String| LoaderError::Attach {
        iface: iface.to_owned(),
        reason,
    };
    let ifindex = if_index(iface).ok_or_else(|| attach_error("no such interface".into()))?;
    let program: &mut Xdp = ebpf
        .program_mut(INGRESS_PROGRAM)
        .ok_or(LoaderError::MissingProgram(INGRESS_PROGRAM))?
        .try_into()
        .map_err(|e: ProgramError| attach_error(e.to_string()))?;

    if let Some((pin, mode)) = find_pinned_link(pin_dir, iface) {
        match replace_pinned(program, &pin) {
            Ok(link) => {
                info!(
                    iface,
                    mode = mode.name(),
                    "Adopted the pinned XDP link; program replaced atomically"
                );
                if requested != XdpModeSetting::Auto && requested.name() != mode.name() {
                    warn!(
                        iface,
                        running = mode.name(),
                        requested = requested.name(),
                        "Kept the pinned link's XDP mode; stop the daemon cleanly to change it"
                    );
                }
                return Ok(Attachment {
                    iface: iface.to_owned(),
                    ifindex,
                    mode,
                    adopted: true,
                    link: Some(link),
                    pin: Some(pin),
                });
            }
            Err(reason) => {
                warn!(iface, pin = %pin.display(), %reason, "Pinned XDP link is stale; attaching afresh");
                let _ = fs::remove_file(&pin);
            }
        }
    }

    const NATIVE: (AttachedMode, XdpMode) = (AttachedMode::Native, XdpMode::Driver);
    const SKB: (AttachedMode, XdpMode) = (AttachedMode::Skb, XdpMode::Skb);
    let modes: &[(AttachedMode, XdpMode)] = match requested {
        XdpModeSetting::Auto => &[NATIVE, SKB],
        XdpModeSetting::Native => &[NATIVE],
        XdpModeSetting::Skb => &[SKB],
    };
    let mut failures = Vec::new();
    for &(mode, xdp_mode) in modes {
        match program.attach(iface, xdp_mode) {
            Ok(link_id) => {
                if !failures.is_empty() {
                    warn!(iface, errors = %failures.join("; "), "XDP native attach failed; running in skb (generic) mode");
                }
                let link = program
                    .take_link(link_id)
                    .map_err(|e| attach_error(e.to_string()))?;
                return pin_link(link, iface, ifindex, mode, pin_dir);
            }
            Err(e) => failures.push(format!("{} mode: {}", mode.name(), error_chain(&e))),
        }
    }
    Err(attach_error(failures.join("; ")))
}

/// Where a TC program goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    /// The ingress datapath, instead of XDP.
    Ingress,
    /// Response capture.
    Egress,
}

impl TcHook {
    const fn program(self) -> &'static str {
        match self {
            TcHook::Ingress => INGRESS_TC_PROGRAM,
            TcHook::Egress => EGRESS_PROGRAM,
        }
    }

    const fn mode(self) -> AttachedMode {
        match self {
            TcHook::Ingress => AttachedMode::TcIngress,
            TcHook::Egress => AttachedMode::TcEgress,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            TcHook::Ingress => "ingress",
            TcHook::Egress => "egress",
        }
    }

    fn pin(self, pin_dir: &Path, iface: &str) -> PathBuf {
        pin_dir
            .join("links")
            .join(format!("tc-{iface}-{}", self.name()))
    }
}

/// Removes a link an earlier daemon pinned for the hook not in use now (the datapath
/// moved between XDP and TC ingress): unpinned, the kernel detaches it.
pub fn unpin_other_ingress(pin_dir: &Path, iface: &str, now: AttachedMode) {
    let stale: Vec<PathBuf> = match now {
        AttachedMode::TcIngress => find_pinned_link(pin_dir, iface)
            .map(|(pin, _)| pin)
            .into_iter()
            .collect(),
        _ => vec![TcHook::Ingress.pin(pin_dir, iface)],
    };
    for pin in stale.into_iter().filter(|pin| pin.exists()) {
        match fs::remove_file(&pin) {
            Ok(()) => {
                info!(iface, pin = %pin.display(), "Removed the other ingress hook's pinned link")
            }
            Err(e) => {
                warn!(iface, pin = %pin.display(), error = %e, "Removing a stale pinned link failed")
            }
        }
    }
}

/// Attaches a TC program to `iface` through a pinned TCX link (adopting one an
/// earlier daemon left, as for XDP).
pub fn attach_tc(
    ebpf: &mut Ebpf,
    iface: &str,
    hook: TcHook,
    pin_dir: &Path,
) -> Result<Attachment, LoaderError> {
    let attach_error = |reason: String| LoaderError::Attach {
        iface: iface.to_owned(),
        reason: format!("tc {}: {reason}", hook.name()),
    };
    let ifindex = if_index(iface).ok_or_else(|| attach_error("no such interface".into()))?;
    let name = hook.program();
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(LoaderError::MissingProgram(name))?
        .try_into()
        .map_err(|e: ProgramError| attach_error(e.to_string()))?;
    let pin = hook.pin(pin_dir, iface);
    let attachment = |link, adopted| Attachment {
        iface: iface.to_owned(),
        ifindex,
        mode: hook.mode(),
        adopted,
        link: Some(link),
        pin: Some(pin.clone()),
    };
    if pin.exists() {
        let adopted = (|| {
            let pinned = PinnedLink::from_pin(&pin).map_err(|e| error_chain(&e))?;
            let link =
                SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| error_chain(&e))?;
            let id = program.attach_to_link(link).map_err(|e| error_chain(&e))?;
            let link = program.take_link(id).map_err(|e| error_chain(&e))?;
            FdLink::try_from(link).map_err(|e| error_chain(&e))
        })();
        match adopted {
            Ok(link) => return Ok(attachment(link, true)),
            Err(reason) => {
                warn!(iface, pin = %pin.display(), %reason, "Pinned TC link is stale; attaching afresh");
                let _ = fs::remove_file(&pin);
            }
        }
    }
    let attach_type = match hook {
        TcHook::Ingress => TcAttachType::Ingress,
        TcHook::Egress => TcAttachType::Egress,
    };
    let id = program
        .attach(iface, attach_type)
        .map_err(|e| attach_error(error_chain(&e)))?;
    let link = program
        .take_link(id)
        .map_err(|e| attach_error(error_chain(&e)))?;
    let link = FdLink::try_from(link)
        .map_err(|e| attach_error(format!("TCX link needed (Linux 6.6+): {}", error_chain(&e))))?;
    let pinned = link
        .pin(&pin)
        .map_err(|e| attach_error(format!("pinning at {}: {}", pin.display(), error_chain(&e))))?;
    info!(iface, hook = hook.name(), "Attached TC program");
    Ok(attachment(FdLink::from(pinned), false))
}

fn replace_pinned(program: &mut Xdp, pin: &Path) -> Result<FdLink, String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| error_chain(&e))?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| error_chain(&e))?;
    let id = program.attach_to_link(link).map_err(|e| error_chain(&e))?;
    let link = program.take_link(id).map_err(|e| error_chain(&e))?;
    FdLink::try_from(link).map_err(|e| error_chain(&e))
}

fn pin_link(
    link: XdpLink,
    iface: &str,
    ifindex: u32,
    mode: AttachedMode,
    pin_dir: &Path,
) -> Result<Attachment, LoaderError> {
    let pin = link_pin_path(pin_dir, iface, mode);
    match FdLink::try_from(link) {
        Ok(fd_link) => {
            let pinned = fd_link.pin(&pin).map_err(|e| LoaderError::Attach {
                iface: iface.to_owned(),
                reason: format!("pinning the link at {}: {}", pin.display(), error_chain(&e)),
            })?;
            // Keep our own fd too; `detach` unpins, then drops it.
            let link = FdLink::from(pinned);
            info!(iface, mode = mode.name(), "Attached XDP");
            Ok(Attachment {
                iface: iface.to_owned(),
                ifindex,
                mode,
                adopted: false,
                link: Some(link),
                pin: Some(pin),
            })
        }
        Err(e) => {
            // Netlink attachment (kernels without XDP bpf_link): no pin, no crash survival.
            warn!(iface, reason = %error_chain(&e), "XDP link cannot be pinned; it ends with the daemon");
            Err(LoaderError::Attach {
                iface: iface.to_owned(),
                reason: "kernel lacks XDP bpf_link support (Linux 5.9+ needed)".into(),
            })
        }
    }
}

/// `error: cause: cause`, since aya nests the useful part (errno) a level or two down.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Index of an interface, or None when it does not exist.
pub fn if_index(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}
