//! Map names, shared by the kernel programs (which define them) and the daemon
//! (which opens, pins and sizes them). Kernel object names are limited to 15 bytes.

/// Exact IPv4 host blocklist: `[u8; 4]` (network order) -> `ListEntry`.
pub const BLOCK_V4_HOSTS: &str = "BLOCK_V4_HOSTS";
/// Exact IPv6 host blocklist: `[u8; 16]` -> `ListEntry`.
pub const BLOCK_V6_HOSTS: &str = "BLOCK_V6_HOSTS";
/// IPv4 prefix blocklist (LPM trie): `Key<[u8; 4]>` -> `ListEntry`.
pub const BLOCK_V4_NETS: &str = "BLOCK_V4_NETS";
/// IPv6 prefix blocklist (LPM trie): `Key<[u8; 16]>` -> `ListEntry`.
pub const BLOCK_V6_NETS: &str = "BLOCK_V6_NETS";
/// IPv4 allowlist (LPM trie, hosts included as /32).
pub const ALLOW_V4: &str = "ALLOW_V4";
/// IPv6 allowlist (LPM trie, hosts included as /128).
pub const ALLOW_V6: &str = "ALLOW_V6";
/// Per-source statistics (LRU hash): `[u8; 16]` (IPv4 as IPv4-mapped IPv6) -> `IpStats`.
pub const IP_STATS: &str = "IP_STATS";
/// Per-CPU counters per interface and action: `ActionCounter` at
/// `counter_index(ifindex, action)`.
pub const IFACE_COUNTERS: &str = "IFACE_COUNTERS";
/// Interfaces with counters of their own; higher ifindexes share the last slot.
pub const COUNTER_IFACES: u32 = 256;

/// Where the counter of `action` on interface `ifindex` lives in `IFACE_COUNTERS`.
#[inline(always)]
pub const fn counter_index(ifindex: u32, action: u32) -> u32 {
    let slot = if ifindex < COUNTER_IFACES {
        ifindex
    } else {
        COUNTER_IFACES - 1
    };
    slot * crate::datapath::Action::COUNT as u32 + action
}

/// IPv4 throttles (LPM trie): `Key<[u8; 4]>` -> `ListEntry` with `rate_pps`.
pub const THROTTLE_V4: &str = "THROTTLE_V4";
/// IPv6 throttles (LPM trie): `Key<[u8; 16]>` -> `ListEntry` with `rate_pps`.
pub const THROTTLE_V6: &str = "THROTTLE_V6";
/// One-slot array: `RateConfig`, the default per-source limits.
pub const RATE_CONFIG: &str = "RATE_CONFIG";
/// Per-source token buckets (LRU hash): `[u8; 16]` -> `TokenBuckets`.
pub const RATE_STATE: &str = "RATE_STATE";

/// One-slot array: `DatapathState`, which list maps are non-empty.
pub const DATAPATH_STATE: &str = "DATAPATH_STATE";

/// Ring buffer of request `Sample`s (HTTP payload, captured on ingress).
pub const REQUEST_SAMPLES: &str = "REQUEST_SAMPLES";
/// Ring buffer of response `Sample`s (captured on egress).
pub const RESPONSE_SAMPLES: &str = "RESPONSE_SAMPLES";
/// Per-CPU count of samples the kernel could not reserve ring space for (index 0).
pub const SAMPLES_LOST: &str = "SAMPLES_LOST";
/// Per-CPU count of samples written (index 0).
pub const SAMPLES_CAPTURED: &str = "SAMPLES_CAPTURED";
/// One-slot array: `CaptureConfig`.
pub const CAPTURE_CONFIG: &str = "CAPTURE_CONFIG";
/// Bitmap of monitored server ports: `PORT_BITMAP_WORDS` u32 words.
pub const CAPTURE_PORTS: &str = "CAPTURE_PORTS";
/// One-slot array: `READER_*`, whether the daemon stopped polling the rings and waits
/// for the kernel to wake it.
pub const CAPTURE_READER: &str = "CAPTURE_READER";
/// Per-connection capture budget (LRU): `FlowKey` -> `FlowBudget`.
pub const CAPTURE_FLOWS: &str = "CAPTURE_FLOWS";

/// Default size of each sample ring; a power-of-two multiple of the page size.
pub const DEFAULT_SAMPLES_RING_BYTES: u32 = 16 << 20;
/// Connections whose capture budget the kernel tracks.
pub const DEFAULT_CAPTURE_FLOWS: u32 = 1 << 16;

/// Every map the daemon pins, so that the CLI, a restarted daemon and the
/// kernel programs share one state.
pub const PINNED: [&str; 12] = [
    BLOCK_V4_HOSTS,
    BLOCK_V6_HOSTS,
    BLOCK_V4_NETS,
    BLOCK_V6_NETS,
    ALLOW_V4,
    ALLOW_V6,
    IP_STATS,
    IFACE_COUNTERS,
    DATAPATH_STATE,
    THROTTLE_V4,
    THROTTLE_V6,
    RATE_STATE,
];

/// Capacity compiled into the object; the daemon resizes from its config at load time.
pub const DEFAULT_IP_STATS_CAPACITY: u32 = 1 << 20;
/// Capacity of each blocklist map (hosts and prefixes, per family).
pub const DEFAULT_BLOCKLIST_CAPACITY: u32 = 1 << 20;
/// Capacity of each allowlist trie.
pub const DEFAULT_ALLOWLIST_CAPACITY: u32 = 1 << 16;
/// Capacity of each throttle trie.
pub const DEFAULT_THROTTLE_CAPACITY: u32 = 1 << 16;
